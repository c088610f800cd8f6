"""Fused (flash-style) local attention as Pallas kernels: the logits never leave registers.

Each kernel instance owns one ``tile`` of queries (or keys) of one (image, head) plane and
walks the ``kh x kw`` window offsets: for window row ``a`` (a loop) and column ``b``
(unrolled), it loads the tile of keys shifted by ``(a - rh, b - rw)`` from a plane padded by
the window's radius, forms the ``tile`` logits, and folds them into a running (online)
softmax. Nothing ``k^2``-sized is ever written to memory: the forward pass writes the
output and the per-query log-sum-exp, the backward pass recomputes the probabilities.

* forward: ``out`` and ``lse`` per query tile;
* backward, query side: ``dq`` (content part), ``delta = sum(dO * out)`` and the
  per-query sums of the logit gradients over each window row and column, from which plain
  einsums give ``rel_h``, ``rel_w`` and the positional part of ``dq``;
* backward, key side: each key tile visits the ``kh x kw`` query tiles that see it (the
  same shifts, mirrored) and accumulates ``dk`` and ``dv`` without atomics.

The relative logits ``q[:d/2] . rel_h[t]`` and ``q[d/2:] . rel_w[t]`` are computed outside
the kernels (``kh + kw`` per query, like the reference) and added per window row and column.
Logits, softmax and accumulation are float32 (elementwise products, so no TF32 rounding on
GPUs); inputs may be bfloat16. The head depth is zero-padded to a power of two and the
planes to whole tiles. Each window column is unrolled in the kernels, so their code grows
with ``kw``: meant for the paper's windows (3 to 11), not global ones (use ``dense``).

Measured on an H200 (benchmarks/README.md, GPU): 1.7x faster than ``blocked`` at head
depth 8, slower from depth 16 on, where the per-instance tiles (8 x 8 x d floats) no
longer fit in registers.

The kernel programs and their tiled layout are in ``fused_kernels``. On GPU the kernels
compile through Triton; on other backends they run in Pallas's interpret mode, which is
exact but slow: for tests, not for training.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sasa_jax.ops import _contract
from sasa_jax.ops.fused_kernels import (Geometry, backward_key_kernel, backward_query_kernel,
                                        crop, forward_kernel, pad_plane, pad_spatial,
                                        pallas_call, planes_spec, tile_spec, whole_spec)


def _relative_planes(q, rel, geometry: Geometry):
  """``(P, kh, Hq, Wq)`` row and ``(P, kw, Hq, Wq)`` column logits of ``q`` (P, H, W, d)."""
  logit_h, logit_w = _contract.relative_logits(q, *rel)  # (P, H, W, kh), (P, H, W, kw)
  return tuple(pad_spatial(x.transpose(0, 3, 1, 2), geometry, halo=False, axis=2)
               for x in (logit_h, logit_w))


def _forward(q, k, v, rel, geometry: Geometry):
  """``(out, lse)`` of ``(P, H, W, d)`` planes, tile-padded: ``(P, Hq, Wq, dp)`` and
  ``(P, Hq, Wq)``."""
  planes = q.shape[0]
  w, (hq, wq) = geometry.window, geometry.tiled
  relative = bool(rel)
  q_pad = pad_plane(q, geometry, halo=False)
  k_pad, v_pad = (pad_plane(x, geometry, halo=True) for x in (k, v))
  depth = q_pad.shape[-1]
  args = [q_pad, k_pad, v_pad]
  in_specs = [tile_spec(geometry, depth), whole_spec(k_pad.shape), whole_spec(v_pad.shape)]
  if relative:
    args += _relative_planes(q, rel, geometry)
    in_specs += [planes_spec(geometry, w.kh), planes_spec(geometry, w.kw)]
  return pallas_call(
      functools.partial(forward_kernel, geometry=geometry, relative=relative), geometry,
      planes, in_specs, [tile_spec(geometry, depth), tile_spec(geometry)],
      [jax.ShapeDtypeStruct((planes, hq, wq, depth), q.dtype),
       jax.ShapeDtypeStruct((planes, hq, wq), jnp.float32)])(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, rel, geometry: Geometry):
  """Local attention of ``(P, H, W, d)`` planes; ``rel`` is ``(rel_h, rel_w)`` or ``()``."""
  out, _ = _forward(q, k, v, rel, geometry)
  return crop(out, geometry, q.shape[-1])


def _attend_fwd(q, k, v, rel, geometry):
  out, lse = _forward(q, k, v, rel, geometry)
  return crop(out, geometry, q.shape[-1]), (q, k, v, rel, out, lse)


def _attend_bwd(geometry: Geometry, residuals, g):
  q, k, v, rel, out, lse = residuals
  planes, height, width, depth = q.shape
  w, (hq, wq) = geometry.window, geometry.tiled
  relative = bool(rel)
  q_pad, g_pad = (pad_plane(x, geometry, halo=False) for x in (q, g))
  depth_pad = q_pad.shape[-1]
  rel_planes = _relative_planes(q, rel, geometry) if relative else ()

  # Query side: dq (content part) and the per-row / per-column logit-gradient sums.
  k_halo, v_halo = (pad_plane(x, geometry, halo=True) for x in (k, v))
  in_specs = [tile_spec(geometry, depth_pad), whole_spec(k_halo.shape),
              whole_spec(v_halo.shape), tile_spec(geometry, depth_pad),
              tile_spec(geometry, depth_pad), tile_spec(geometry)]
  out_specs = [tile_spec(geometry, depth_pad), tile_spec(geometry)]
  out_shape = [jax.ShapeDtypeStruct((planes, hq, wq, depth_pad), jnp.float32),
               jax.ShapeDtypeStruct((planes, hq, wq), jnp.float32)]
  if relative:
    in_specs += [planes_spec(geometry, w.kh), planes_spec(geometry, w.kw)]
    out_specs += [planes_spec(geometry, w.kh), planes_spec(geometry, w.kw)]
    out_shape += [jax.ShapeDtypeStruct((planes, w.kh, hq, wq), jnp.float32),
                  jax.ShapeDtypeStruct((planes, w.kw, hq, wq), jnp.float32)]
  dq, delta, *ds_sums = pallas_call(
      functools.partial(backward_query_kernel, geometry=geometry, relative=relative),
      geometry, planes, in_specs, out_specs, out_shape)(
          q_pad, k_halo, v_halo, g_pad, out, lse, *rel_planes)

  # Key side: dk and dv, reading the query-side planes padded by the window's radius.
  query_side = [pad_spatial(x[:, :height, :width], geometry, halo=True)
                for x in (q_pad, g_pad, lse, delta)]
  query_side += [pad_spatial(x[:, :, :height, :width], geometry, halo=True, axis=2)
                 for x in rel_planes]
  dk, dv = pallas_call(
      functools.partial(backward_key_kernel, geometry=geometry, relative=relative), geometry,
      planes, [tile_spec(geometry, depth_pad)] * 2 + [whole_spec(x.shape) for x in query_side],
      [tile_spec(geometry, depth_pad)] * 2,
      [jax.ShapeDtypeStruct((planes, hq, wq, depth_pad), jnp.float32)] * 2)(
          pad_plane(k, geometry, halo=False), pad_plane(v, geometry, halo=False), *query_side)

  dq, dk, dv = (crop(x, geometry, depth) for x in (dq, dk, dv))
  drel = ()
  if relative:
    rel_h, rel_w = rel
    half = depth // 2
    ds_row, ds_col = (x[:, :, :height, :width] for x in ds_sums)  # (P, kh|kw, H, W)
    dq = dq + jnp.concatenate([jnp.einsum("pthw,tc->phwc", ds_row, rel_h.astype(jnp.float32)),
                               jnp.einsum("pthw,tc->phwc", ds_col, rel_w.astype(jnp.float32))],
                              axis=-1)
    q32 = q.astype(jnp.float32)
    drel = (jnp.einsum("pthw,phwc->tc", ds_row, q32[..., :half]).astype(rel_h.dtype),
            jnp.einsum("pthw,phwc->tc", ds_col, q32[..., half:]).astype(rel_w.dtype))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), drel


_attend.defvjp(_attend_fwd, _attend_bwd)


def fused(query, key, value, *, window, rel_h, rel_w, scale):
  """Fused local attention; same contract as ``reference``.

  Compiled with Triton where JAX's backend is a GPU, run in Pallas's (slow, exact)
  interpret mode elsewhere.
  """
  return _fused(query, key, value, window=window, rel_h=rel_h, rel_w=rel_w, scale=scale,
                interpret=jax.default_backend() != "gpu")


def triton(query, key, value, *, window, rel_h, rel_w, scale):
  """The kernels compiled with Triton, whatever the host: the branch for GPU of the
  automatic choice, chosen when a program is lowered for a GPU."""
  return _fused(query, key, value, window=window, rel_h=rel_h, rel_w=rel_w, scale=scale,
                interpret=False)


def _fused(query, key, value, *, window, rel_h, rel_w, scale, interpret: bool):
  batch, height, width, heads, depth = query.shape
  geometry = Geometry(window, height, width, scale, interpret=interpret)

  def planes(x):  # (B, H, W, N, d) -> (B * N, H, W, d)
    return x.transpose(0, 3, 1, 2, 4).reshape(batch * heads, height, width, depth)

  rel = () if rel_h is None else (rel_h, rel_w)
  out = _attend(planes(query), planes(key), planes(value), rel, geometry)
  return out.reshape(batch, heads, height, width, depth).transpose(0, 2, 3, 1, 4)
