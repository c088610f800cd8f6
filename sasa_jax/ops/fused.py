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

On GPU the kernels compile through Triton; on other backends they run in Pallas's
interpret mode, which is exact but slow: for tests, not for training.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sasa_jax.ops import _contract

# Query/key tile per kernel instance (rows, columns), capped at the image's next power of
# two; Triton needs power-of-two block shapes.
TILE = 8
_NUM_WARPS = 4


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static shapes of one call; hashable so that it can be a ``custom_vjp`` static arg."""

  window: _contract.Window
  height: int
  width: int
  scale: float
  interpret: bool

  @property
  def tile(self) -> tuple[int, int]:
    return (min(TILE, pl.next_power_of_2(self.height)),
            min(TILE, pl.next_power_of_2(self.width)))

  @property
  def tiles(self) -> tuple[int, int]:
    th, tw = self.tile
    return math.ceil(self.height / th), math.ceil(self.width / tw)

  @property
  def tiled(self) -> tuple[int, int]:
    """The plane's extent rounded up to whole tiles."""
    (th, tw), (nh, nw) = self.tile, self.tiles
    return nh * th, nw * tw


# ---------------------------------------------------------------------------- layout


def _pad_spatial(x, geometry: _Geometry, halo: bool, axis: int = 1):
  """Pads ``x``'s spatial axes ``axis, axis + 1`` (extent ``H, W``) to whole tiles, and by
  the window's radius on both sides when ``halo``."""
  (hq, wq), w = geometry.tiled, geometry.window
  rh, rw = (w.rh, w.rw) if halo else (0, 0)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (rh, hq - geometry.height + rh)
  pad[axis + 1] = (rw, wq - geometry.width + rw)
  return jnp.pad(x, pad)


def _pad_plane(x, geometry: _Geometry, halo: bool):
  """``_pad_spatial`` of ``(P, H, W, d)`` planes, with ``d`` padded to a power of two."""
  x = _pad_spatial(x, geometry, halo)
  return jnp.pad(x, [(0, 0)] * 3 + [(0, pl.next_power_of_2(x.shape[-1]) - x.shape[-1])])


def _crop(x, geometry: _Geometry, depth: int):
  """``(P, Hq, Wq, dp)`` -> ``(P, H, W, depth)``."""
  return x[:, :geometry.height, :geometry.width, :depth]


def _tile_spec(geometry: _Geometry, *trailing: int):
  """BlockSpec of one ``(th, tw, *trailing)`` tile of a tile-padded ``(P, Hq, Wq, ...)``."""
  th, tw = geometry.tile
  return pl.BlockSpec((None, th, tw, *trailing), lambda p, i, j: (p, i, j) + (0,) * len(
      trailing))


def _planes_spec(geometry: _Geometry, *leading: int):
  """BlockSpec of one ``(*leading, th, tw)`` tile of a ``(P, *leading, Hq, Wq)`` array."""
  th, tw = geometry.tile
  return pl.BlockSpec((None, *leading, th, tw), lambda p, i, j: (p,) + (0,) * len(leading) +
                      (i, j))


def _whole_spec(shape):
  """BlockSpec of a whole ``shape[1:]`` plane (the kernel slices it itself)."""
  return pl.BlockSpec((None, *shape[1:]), lambda p, i, j: (p,) + (0,) * (len(shape) - 1))


def _pallas_call(kernel, geometry: _Geometry, planes: int, in_specs, out_specs, out_shape):
  compiler_params = None
  if not geometry.interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    compiler_params = plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1)
  return pl.pallas_call(kernel, grid=(planes, *geometry.tiles), in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape,
                        compiler_params=compiler_params, interpret=geometry.interpret)


# ---------------------------------------------------------------------------- kernels


def _origin(geometry: _Geometry):
  """Image row and column of this instance's tile's first pixel.

  Read once at the kernel's top level: Pallas's interpret mode resolves ``program_id``
  only there, not inside loop bodies.
  """
  th, tw = geometry.tile
  return pl.program_id(1) * th, pl.program_id(2) * tw


def _positions(origin, geometry: _Geometry):
  """Image rows ``(th, 1)`` and columns ``(1, tw)`` of the tile at ``origin``."""
  th, tw = geometry.tile
  return origin[0] + jnp.arange(th)[:, None], origin[1] + jnp.arange(tw)[None, :]


def _inside(positions, size: int):
  return (positions >= 0) & (positions < size)


def _shifted(ref, origin, geometry: _Geometry, row, col, *leading):
  """The ``(th, tw, ...)`` tile of a halo-padded plane ``ref[*leading]``, shifted by
  ``(row, col)`` slots from the tile at ``origin``."""
  th, tw = geometry.tile
  return ref[(*leading, pl.ds(origin[0] + row, th), pl.ds(origin[1] + col, tw))]


def _logits(q, k, row_term, col_term, valid, geometry: _Geometry):
  """``scale * (q . k + row_term + col_term)`` per query, ``MASKED_LOGIT`` where invalid."""
  s = jnp.sum(q * k, axis=-1)
  if row_term is not None:
    s = s + row_term + col_term
  return jnp.where(valid, geometry.scale * s, _contract.MASKED_LOGIT)


def _forward_kernel(*refs, geometry: _Geometry, relative: bool):
  """Writes ``out`` (th, tw, d) and ``lse`` (th, tw) of one query tile."""
  q_ref, k_ref, v_ref, *refs = refs
  rh_ref, rw_ref, o_ref, lse_ref = refs if relative else (None, None, *refs)
  w = geometry.window
  origin = _origin(geometry)
  rows, cols = _positions(origin, geometry)
  q = q_ref[...].astype(jnp.float32)
  col_terms = [rw_ref[b] for b in range(w.kw)] if relative else [None] * w.kw
  col_ok = [_inside(cols + b - w.rw, geometry.width) for b in range(w.kw)]

  def window_row(a, carry):
    m, l, acc = carry
    row_ok = _inside(rows + a - w.rh, geometry.height)
    row_term = rh_ref[a] if relative else None
    logits = [
        _logits(q, _shifted(k_ref, origin, geometry, a, b).astype(jnp.float32), row_term,
                col_terms[b], row_ok & col_ok[b], geometry) for b in range(w.kw)
    ]
    m_new = functools.reduce(jnp.maximum, logits, m)
    correction = jnp.exp(m - m_new)
    l, acc = l * correction, acc * correction[..., None]
    for b, s in enumerate(logits):
      p = jnp.exp(s - m_new)
      l = l + p
      acc = acc + p[..., None] * _shifted(v_ref, origin, geometry, a, b).astype(jnp.float32)
    return m_new, l, acc

  th, tw = geometry.tile
  init = (jnp.full((th, tw), -jnp.inf, jnp.float32), jnp.zeros((th, tw), jnp.float32),
          jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, w.kh, window_row, init)
  o_ref[...] = (acc / l[..., None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _backward_query_kernel(*refs, geometry: _Geometry, relative: bool):
  """``dq`` (content part) and ``delta = sum(do * out)`` of one query tile and, with
  relative logits, the logit gradients summed over each window row (``ds_row``) and column
  (``ds_col``)."""
  q_ref, k_ref, v_ref, do_ref, o_ref, lse_ref, *refs = refs
  rh_ref, rw_ref, dq_ref, delta_ref, dsr_ref, dsc_ref = refs if relative else (
      None, None, *refs, None, None)
  w = geometry.window
  origin = _origin(geometry)
  rows, cols = _positions(origin, geometry)
  q = q_ref[...].astype(jnp.float32)
  do = do_ref[...].astype(jnp.float32)
  lse = lse_ref[...]
  # The same reduction as ``dp`` below, so that a query attending to one key gets
  # ``dp - delta == 0`` exactly (as autodiff of a softmax does).
  delta = jnp.sum(do * o_ref[...].astype(jnp.float32), axis=-1)
  delta_ref[...] = delta
  col_terms = [rw_ref[b] for b in range(w.kw)] if relative else [None] * w.kw
  col_ok = [_inside(cols + b - w.rw, geometry.width) for b in range(w.kw)]

  def window_row(a, carry):
    dq, ds_cols = carry  # ds_cols: the per-column sums, only with relative logits
    row_ok = _inside(rows + a - w.rh, geometry.height)
    row_term = rh_ref[a] if relative else None
    ds_row = jnp.zeros_like(lse)
    new_cols = []
    for b in range(w.kw):
      k = _shifted(k_ref, origin, geometry, a, b).astype(jnp.float32)
      v = _shifted(v_ref, origin, geometry, a, b).astype(jnp.float32)
      p = jnp.exp(_logits(q, k, row_term, col_terms[b], row_ok & col_ok[b], geometry) - lse)
      ds = p * (jnp.sum(do * v, axis=-1) - delta)
      dq = dq + ds[..., None] * k
      if relative:
        ds_row = ds_row + ds
        new_cols.append(ds_cols[b] + ds)
    if relative:
      dsr_ref[a] = geometry.scale * ds_row
    return dq, new_cols

  init = (jnp.zeros(q.shape, jnp.float32),
          [jnp.zeros_like(lse) for _ in range(w.kw)] if relative else [])
  dq, ds_cols = jax.lax.fori_loop(0, w.kh, window_row, init)
  dq_ref[...] = geometry.scale * dq
  if relative:
    for b in range(w.kw):
      dsc_ref[b] = geometry.scale * ds_cols[b]


def _backward_key_kernel(*refs, geometry: _Geometry, relative: bool):
  """``dk`` and ``dv`` of one key tile, from the queries whose windows contain it.

  The query that sees key ``(i, j)`` through window slot ``(a, b)`` sits at
  ``(i + rh - a, j + rw - b)``: in the halo-padded query planes, at shift
  ``(kh - 1 - a, kw - 1 - b)`` from the key tile.
  """
  k_ref, v_ref, q_ref, do_ref, lse_ref, delta_ref, *refs = refs
  rh_ref, rw_ref, dk_ref, dv_ref = refs if relative else (None, None, *refs)
  w = geometry.window
  origin = _origin(geometry)
  rows, cols = _positions(origin, geometry)
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)

  def window_row(a, carry):
    dk, dv = carry
    e = w.kh - 1 - a
    row_ok = _inside(rows + e - w.rh, geometry.height)
    for b in range(w.kw):
      f = w.kw - 1 - b
      valid = row_ok & _inside(cols + f - w.rw, geometry.width)
      q = _shifted(q_ref, origin, geometry, e, f).astype(jnp.float32)
      do = _shifted(do_ref, origin, geometry, e, f).astype(jnp.float32)
      row_term = _shifted(rh_ref, origin, geometry, e, f, a) if relative else None
      col_term = _shifted(rw_ref, origin, geometry, e, f, b) if relative else None
      s = _logits(q, k, row_term, col_term, valid, geometry)
      p = jnp.where(valid, jnp.exp(s - _shifted(lse_ref, origin, geometry, e, f)), 0.0)
      dv = dv + p[..., None] * do
      ds = p * (jnp.sum(do * v, axis=-1) - _shifted(delta_ref, origin, geometry, e, f))
      dk = dk + ds[..., None] * q
    return dk, dv

  dk, dv = jax.lax.fori_loop(0, w.kh, window_row,
                             (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)))
  dk_ref[...] = geometry.scale * dk
  dv_ref[...] = dv


# ---------------------------------------------------------------------------- the op


def _relative_planes(q, rel, geometry: _Geometry):
  """``(P, kh, Hq, Wq)`` row and ``(P, kw, Hq, Wq)`` column logits of ``q`` (P, H, W, d)."""
  logit_h, logit_w = _contract.relative_logits(q, *rel)  # (P, H, W, kh), (P, H, W, kw)
  return tuple(_pad_spatial(x.transpose(0, 3, 1, 2), geometry, halo=False, axis=2)
               for x in (logit_h, logit_w))


def _forward(q, k, v, rel, geometry: _Geometry):
  """``(out, lse)`` of ``(P, H, W, d)`` planes, tile-padded: ``(P, Hq, Wq, dp)`` and
  ``(P, Hq, Wq)``."""
  planes = q.shape[0]
  w, (hq, wq) = geometry.window, geometry.tiled
  relative = bool(rel)
  q_pad = _pad_plane(q, geometry, halo=False)
  k_pad, v_pad = (_pad_plane(x, geometry, halo=True) for x in (k, v))
  depth = q_pad.shape[-1]
  args = [q_pad, k_pad, v_pad]
  in_specs = [_tile_spec(geometry, depth), _whole_spec(k_pad.shape), _whole_spec(v_pad.shape)]
  if relative:
    args += _relative_planes(q, rel, geometry)
    in_specs += [_planes_spec(geometry, w.kh), _planes_spec(geometry, w.kw)]
  return _pallas_call(
      functools.partial(_forward_kernel, geometry=geometry, relative=relative), geometry,
      planes, in_specs, [_tile_spec(geometry, depth), _tile_spec(geometry)],
      [jax.ShapeDtypeStruct((planes, hq, wq, depth), q.dtype),
       jax.ShapeDtypeStruct((planes, hq, wq), jnp.float32)])(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, rel, geometry: _Geometry):
  """Local attention of ``(P, H, W, d)`` planes; ``rel`` is ``(rel_h, rel_w)`` or ``()``."""
  out, _ = _forward(q, k, v, rel, geometry)
  return _crop(out, geometry, q.shape[-1])


def _attend_fwd(q, k, v, rel, geometry):
  out, lse = _forward(q, k, v, rel, geometry)
  return _crop(out, geometry, q.shape[-1]), (q, k, v, rel, out, lse)


def _attend_bwd(geometry: _Geometry, residuals, g):
  q, k, v, rel, out, lse = residuals
  planes, height, width, depth = q.shape
  w, (hq, wq) = geometry.window, geometry.tiled
  relative = bool(rel)
  q_pad, g_pad = (_pad_plane(x, geometry, halo=False) for x in (q, g))
  depth_pad = q_pad.shape[-1]
  rel_planes = _relative_planes(q, rel, geometry) if relative else ()

  # Query side: dq (content part) and the per-row / per-column logit-gradient sums.
  k_halo, v_halo = (_pad_plane(x, geometry, halo=True) for x in (k, v))
  in_specs = [_tile_spec(geometry, depth_pad), _whole_spec(k_halo.shape),
              _whole_spec(v_halo.shape), _tile_spec(geometry, depth_pad),
              _tile_spec(geometry, depth_pad), _tile_spec(geometry)]
  out_specs = [_tile_spec(geometry, depth_pad), _tile_spec(geometry)]
  out_shape = [jax.ShapeDtypeStruct((planes, hq, wq, depth_pad), jnp.float32),
               jax.ShapeDtypeStruct((planes, hq, wq), jnp.float32)]
  if relative:
    in_specs += [_planes_spec(geometry, w.kh), _planes_spec(geometry, w.kw)]
    out_specs += [_planes_spec(geometry, w.kh), _planes_spec(geometry, w.kw)]
    out_shape += [jax.ShapeDtypeStruct((planes, w.kh, hq, wq), jnp.float32),
                  jax.ShapeDtypeStruct((planes, w.kw, hq, wq), jnp.float32)]
  dq, delta, *ds_sums = _pallas_call(
      functools.partial(_backward_query_kernel, geometry=geometry, relative=relative),
      geometry, planes, in_specs, out_specs, out_shape)(
          q_pad, k_halo, v_halo, g_pad, out, lse, *rel_planes)

  # Key side: dk and dv, reading the query-side planes padded by the window's radius.
  query_side = [_pad_spatial(x[:, :height, :width], geometry, halo=True)
                for x in (q_pad, g_pad, lse, delta)]
  query_side += [_pad_spatial(x[:, :, :height, :width], geometry, halo=True, axis=2)
                 for x in rel_planes]
  dk, dv = _pallas_call(
      functools.partial(_backward_key_kernel, geometry=geometry, relative=relative), geometry,
      planes, [_tile_spec(geometry, depth_pad)] * 2 + [_whole_spec(x.shape) for x in query_side],
      [_tile_spec(geometry, depth_pad)] * 2,
      [jax.ShapeDtypeStruct((planes, hq, wq, depth_pad), jnp.float32)] * 2)(
          _pad_plane(k, geometry, halo=False), _pad_plane(v, geometry, halo=False), *query_side)

  dq, dk, dv = (_crop(x, geometry, depth) for x in (dq, dk, dv))
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
  geometry = _Geometry(window, height, width, scale, interpret=interpret)

  def planes(x):  # (B, H, W, N, d) -> (B * N, H, W, d)
    return x.transpose(0, 3, 1, 2, 4).reshape(batch * heads, height, width, depth)

  rel = () if rel_h is None else (rel_h, rel_w)
  out = _attend(planes(query), planes(key), planes(value), rel, geometry)
  return out.reshape(batch, heads, height, width, depth).transpose(0, 2, 3, 1, 4)
