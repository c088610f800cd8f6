"""Local attention as Pallas TPU (Mosaic) kernels: flash-style, heads packed in the lanes.

The kernel programs and their layout are in ``tpu_kernels``; this module calls them:
``(B, H, W, N, d)`` arrays as ``(B, H, W, C)`` images, the forward kernel and the two
backward kernels under one ``custom_vjp`` (the backward pass's residuals are the layer's
own queries, keys, values and output, and the per-head log-sum-exp), the relative tables
as one ``(kh, kw, C)`` table of offsets. Images are read from HBM as they are, a whole
image per block; no padded copy of any array is made in HBM. Excluded borders at dilation
1 (dilation runs on sub-grids, ``ops.subgrids``).

Compiled by Mosaic for TPU; elsewhere it runs in Pallas's TPU interpret mode (exact, slow:
for tests). On a mesh of several devices it runs per device under ``jax.shard_map``
(Mosaic kernels cannot be partitioned automatically), the batch split over every axis of
the mesh set by ``jax.set_mesh``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from sasa_jax.ops import _contract
from sasa_jax.ops.tpu_kernels import (SUBLANES, Geometry, forward_kernel, head_map,
                                      key_kernel, query_kernel, with_halos)

# Whole-image blocks (double-buffered) and their halo copies sit in VMEM: above the
# default scoped limit at 56x56.
_VMEM_LIMIT_BYTES = 96 * 2**20


def hbm_bytes(arrays) -> int:
  """The bytes of ``arrays`` in a TPU's tiled HBM layout, as XLA counts its own ops': the
  minor dimension padded to the 128 lanes, the next to the sublanes (8 of 32 bits)."""
  total = 0
  for x in jax.tree.leaves(arrays):
    *major, rows, lanes = (1,) * (2 - len(x.shape)) + tuple(x.shape)
    sublanes = SUBLANES * max(1, 4 // x.dtype.itemsize)
    total += (math.prod(major) * -(-rows // sublanes) * sublanes * -(-lanes // 128) * 128
              * x.dtype.itemsize)
  return total


def _call(kernel, g: Geometry, images, others, outputs, cost):
  """The pallas_call of ``kernel`` on ``(B, H, W, lanes)`` ``images`` (read through
  their halo copies, ``with_halos``) and ``others`` (whole arrays, e.g. the offset
  table) into ``outputs``: ``(B, H, W, lanes)`` shapes (written a tile at a time), or
  ``(shape, spec)`` pairs. Its cost estimate declares the flops (``cost``) and every
  byte of its operands and results, in HBM's layout."""
  image_specs = [pl.BlockSpec((None, g.height, g.width, x.shape[-1]),
                              lambda b, i: (b, 0, 0, 0)) for x in images]
  whole_specs = [pl.BlockSpec(x.shape, lambda b, i, n=x.ndim: (0,) * n) for x in others]
  shapes, out_specs = [], []
  for output in outputs:
    shape, spec = output if isinstance(output, tuple) else (output, pl.BlockSpec(
        (None, g.tile, g.width, output.shape[-1]), lambda b, i: (b, i, 0, 0)))
    shapes.append(shape)
    out_specs.append(spec)
  halos = [pltpu.VMEM((g.halo_height, g.padded_width, x.shape[-1]), x.dtype)
           for x in images]
  # The tiles of an image in order (their halo copies are made at the first); megacore
  # chips split the images between their cores. Interpret mode runs in order anyway, and
  # its grid does not count the axes that jax.vmap adds (JAX 0.10).
  semantics = None if g.interpret else ("parallel", "arbitrary")
  operands = (*images, *others)
  return pl.pallas_call(
      with_halos(functools.partial(kernel, g=g), len(images), g),
      grid=(images[0].shape[0], g.tiles), in_specs=image_specs + whole_specs,
      out_specs=out_specs, out_shape=shapes, scratch_shapes=halos,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics,
                                           vmem_limit_bytes=_VMEM_LIMIT_BYTES),
      interpret=pltpu.InterpretParams() if g.interpret else False,
      cost_estimate=pl.CostEstimate(
          flops=cost, transcendentals=cost // 8,
          bytes_accessed=hbm_bytes(operands) + hbm_bytes(shapes)))(*operands)


def _flops(g: Geometry, batch: int, channels: int) -> int:
  """Per query and offset: q.(k + r), p.v and the head sums: about 6 C multiply-adds."""
  return 2 * 6 * batch * g.height * g.width * g.window.kh * g.window.kw * channels


def _varying_axes(x) -> frozenset:
  """The manual mesh axes (of an enclosing ``shard_map``) over which ``x`` varies."""
  axis_type = getattr(jax.typeof(x), "mat", None)  # JAX >= 0.10; earlier ``vma``.
  if axis_type is None:
    return frozenset(getattr(jax.typeof(x), "vma", ()))
  return frozenset(axis_type.varying)


def _like(x, lanes=None, dtype=None, shape=None):
  """The shape of a kernel's result from its input ``x``: ``x``'s with ``lanes`` last
  (or ``shape``), in ``dtype``; inside a ``shard_map``, varying as ``x`` does."""
  axis_type = getattr(jax.typeof(x), "mat", None)
  return jax.ShapeDtypeStruct(shape or (*x.shape[:-1], lanes or x.shape[-1]),
                              dtype or x.dtype,
                              **({"manual_axis_type": axis_type} if axis_type else {}))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attend(q, k, v, table, g: Geometry):
  """Local attention of ``(B, H, W, C)`` images; ``table`` ``(kh, kw, C)``."""
  return _attend_fwd(q, k, v, table, g)[0]


def _attend_fwd(q, k, v, table, g):
  batch, channels = q.shape[0], q.shape[-1]
  out, lse = _call(forward_kernel, g, (q, k, v), (table,),
                   (_like(q), _like(q, g.heads, jnp.float32)), _flops(g, batch, channels))
  return out, (q, k, v, table, out, lse)


def _attend_bwd(g: Geometry, residuals, grad):
  q, k, v, table, out, lse = residuals
  batch, channels = q.shape[0], q.shape[-1]
  flops = 2 * _flops(g, batch, channels)
  # delta = do . out per head: on the lanes as they are (a matmul with the head map; a
  # reshape to (..., N, d) would move the heads to the sublanes, a copy), in float32.
  delta = jnp.einsum("bhwc,cn->bhwn", grad.astype(jnp.float32) * out,
                     head_map(channels, g.heads), precision=jax.lax.Precision.HIGHEST)
  stats = jnp.concatenate([lse, delta], axis=-1)
  dtable = _like(q, dtype=jnp.float32, shape=(batch, g.tiles, *table.shape))
  dq, dtable = _call(
      query_kernel, g, (q, grad, stats, k, v), (table,),
      (_like(q), (dtable, pl.BlockSpec((None, None, *table.shape),
                                       lambda b, i: (b, i, 0, 0, 0)))), flops)
  dk, dv = _call(key_kernel, g, (k, v, q, grad, stats), (table,), (_like(k), _like(v)),
                 flops)
  dtable = dtable.sum(axis=(0, 1))
  # Inside a shard_map that gives every device the same tables: their gradient is the
  # sum of every device's.
  shared = tuple(_varying_axes(dtable) - _varying_axes(table))
  if shared:
    dtable = jax.lax.psum(dtable, shared)
  return dq, dk, dv, dtable.astype(table.dtype)


_attend.defvjp(_attend_fwd, _attend_bwd)


def _offset_table(rel_h, rel_w, window: _contract.Window, heads: int, depth: int):
  """``(kh, kw, C)``: entry ``[a, b]`` is ``concat(rel_h[a], rel_w[b])`` for every head,
  zero without relative tables."""
  if rel_h is None:
    return jnp.zeros((window.kh, window.kw, heads * depth), jnp.float32)
  half = depth // 2
  per_head = jnp.concatenate(
      [jnp.broadcast_to(rel_h[:, None, :], (window.kh, window.kw, half)),
       jnp.broadcast_to(rel_w[None, :, :], (window.kh, window.kw, half))], axis=-1)
  return jnp.tile(per_head.astype(jnp.float32), (1, 1, heads))


def _run(query, key, value, rel_h, rel_w, *, window, scale, interpret):
  batch, height, width, heads, depth = query.shape
  g = Geometry(window, height, width, heads, scale, interpret)
  images = [x.reshape(batch, height, width, heads * depth) for x in (query, key, value)]
  out = _attend(*images, _offset_table(rel_h, rel_w, window, heads, depth), g)
  return out.reshape(query.shape)


def tpu(query, key, value, *, window, rel_h, rel_w, scale):
  """The TPU kernels; same contract as ``reference`` (excluded borders, dilation 1).
  Compiled by Mosaic where JAX's backend is a TPU; in Pallas's TPU interpret mode
  elsewhere (exact and slow: for tests)."""
  return _per_device(query, key, value, rel_h, rel_w, window=window, scale=scale,
                     interpret=jax.default_backend() != "tpu")


def mosaic(query, key, value, *, window, rel_h, rel_w, scale):
  """The TPU kernels compiled by Mosaic, whatever the host: the branch for TPU of the
  automatic choice, chosen when a program is lowered for TPU (also from another host)."""
  return _per_device(query, key, value, rel_h, rel_w, window=window, scale=scale,
                     interpret=False)


def _per_device(query, key, value, rel_h, rel_w, **kwargs):
  """``_run`` on each device's share of the batch (``on_each_device``)."""
  assert kwargs["window"].borders == "exclude" and kwargs["window"].dilation == (1, 1)
  return on_each_device(functools.partial(_run, **kwargs), (query, key, value),
                        (rel_h, rel_w))


def on_each_device(run, batched, replicated):
  """``run(*batched, *replicated)``, under ``jax.shard_map`` over the batch (the leading
  axis of ``batched`` and of every result) where a mesh of several devices is set
  (``jax.set_mesh``): a Mosaic kernel runs on each device's share, as it cannot be
  partitioned automatically. Inside a ``shard_map`` of the caller's (every axis manual),
  on the shard as it is. ``replicated`` arrays go whole to every device; their gradients
  are summed over the devices by shard_map's transpose (``check_vma=False``), rather than
  in the kernels' ``custom_vjp``."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
    return run(*batched, *replicated)
  batch = PartitionSpec(mesh.axis_names)
  return jax.shard_map(run, mesh=mesh, in_specs=(batch,) * len(batched)
                       + (None,) * len(replicated), out_specs=batch,
                       check_vma=False)(*batched, *replicated)
