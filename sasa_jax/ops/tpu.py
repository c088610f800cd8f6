"""Local attention as Pallas TPU (Mosaic) kernels: flash-style, heads packed in the lanes.

The layer's ``(B, H, W, N, d)`` queries, keys and values are read as ``(B, H, W, C)``
images, ``C = N·d`` channels on the TPU's 128 lanes: every head at once, however shallow
(``d = 8`` at the first stage of the ImageNet models). Each kernel instance owns a tile of
``TILE_ROWS`` image rows of one image and walks the ``kh x kw`` window offsets: the keys
of offset ``(a, b)`` for the whole tile are one shifted slice of the image (a row offset
on the untiled axis, a column offset by rolling the sublanes), so nothing ``k^2``-sized
is ever written to memory:

* forward: per offset, the logits of every head are ``(q * (k + r_ab)) @ E`` (``E``, the
  ``(C, N)`` one-hot of each channel's head, sums each head's ``d`` lanes on the MXU;
  ``r_ab = [rel_h[a], rel_w[b]]`` tiled over the heads folds the relative logits into the
  keys), folded into an online softmax; the output and the per-head log-sum-exp go to
  memory;
* backward, query side: ``dq`` and the relative tables' gradient (per tile; summed
  outside), recomputing the probabilities;
* backward, key side: ``dk`` and ``dv`` of a tile of keys, from the queries that see it
  (the same shifts, mirrored), again recomputing; no atomics.

Logits, softmax and accumulation are float32 (inputs may be bfloat16). Images are read
from HBM as they are, a whole image per block, and copied once per image into VMEM with
the window's halo (zero rows; the columns wrap around as they roll, masked): no padded
copy of any array is made in HBM, and the backward pass's residuals are the layer's own
queries, keys, values and output. Excluded borders at dilation 1 (dilation runs on
sub-grids, ``ops.subgrids``).

Compiled by Mosaic for TPU; elsewhere it runs in Pallas's TPU interpret mode (exact, slow:
for tests). On a mesh of several devices it runs per device under ``jax.shard_map``
(Mosaic kernels cannot be partitioned automatically), the batch split over every axis of
the mesh set by ``jax.set_mesh``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec

from sasa_jax.ops import _contract

TILE_ROWS = 8
SUBLANES = 8
# Whole-image blocks (double-buffered) and their halo copies sit in VMEM: above the
# default scoped limit at 56x56.
_VMEM_LIMIT_BYTES = 96 * 2**20


@dataclasses.dataclass(frozen=True)
class _Geometry:
  """Static shapes of one call; hashable, for ``custom_vjp``."""

  window: _contract.Window
  height: int
  width: int
  heads: int
  scale: float
  interpret: bool

  @property
  def tile(self) -> int:
    return min(TILE_ROWS, self.height)

  @property
  def tiles(self) -> int:
    return math.ceil(self.height / self.tile)

  @property
  def padded_width(self) -> int:
    """Columns computed per row: the width rounded up to the sublanes."""
    return -(-self.width // SUBLANES) * SUBLANES

  @property
  def halo_height(self) -> int:
    """Rows of an image's copy in VMEM: the window's radius of zeros above, then whole
    tiles and the radius again."""
    return self.tiles * self.tile + 2 * self.window.rh


def _heads(channels: int, heads: int) -> jax.Array:
  """``(C, N)`` float32: channel ``c`` belongs to head ``c // (C / N)``."""
  depth = channels // heads
  # lax.div: jnp's floor division of integers lowers through sign(), which Mosaic only
  # lowers knowing the TPU it runs on (not when compiling for one from another host).
  channel = jax.lax.broadcasted_iota(jnp.int32, (channels, heads), 0)
  return (jax.lax.div(channel, depth) ==
          jax.lax.broadcasted_iota(jnp.int32, (channels, heads), 1)).astype(jnp.float32)


# The head sums and spreads are float32 matmuls: at full precision (by default a TPU
# multiplies float32 in one bfloat16 pass, 3 significant digits).
_EXACT = jax.lax.Precision.HIGHEST


def _per_head(x, heads):
  """``(P, C) -> (P, N)``: the sum of each head's channels (on the MXU)."""
  return jnp.dot(x, heads, precision=_EXACT, preferred_element_type=jnp.float32)


def _per_channel(x, heads):
  """``(P, N) -> (P, C)``: each head's value on its channels."""
  return jax.lax.dot_general(x, heads, (((1,), (1,)), ((), ())), precision=_EXACT,
                             preferred_element_type=jnp.float32)


def _positions(g: _Geometry):
  """The image row and column of each query of this instance's tile (its ``P`` queries
  row-major), ``(P, N)`` each."""
  index = jax.lax.broadcasted_iota(jnp.int32, (g.tile * g.padded_width, g.heads), 0)
  row = jax.lax.div(index, g.padded_width)  # Not //: see _heads.
  return pl.program_id(1) * g.tile + row, index - row * g.padded_width


def _inside(position, size):
  return (position >= 0) & (position < size)


def _with_halos(kernel, images: int, g: _Geometry):
  """``kernel`` on VMEM copies of its first ``images`` inputs with the window's halo:
  zero rows above and below, and zero columns up to the rounded width. A copy is made
  at an image's first tile (the tiles of an image run in order on one core) and read by
  all of them; the images themselves come from HBM as they are, unpadded."""

  def with_halos(*refs):
    inputs, halos = refs[:images], refs[-images:]

    @pl.when(pl.program_id(1) == 0)
    def _():
      for image, halo in zip(inputs, halos):
        halo[...] = jnp.zeros(halo.shape, halo.dtype)
        halo[pl.ds(g.window.rh, g.height), pl.ds(0, g.width)] = image[...]

    kernel(*halos, *refs[images:-images])

  return with_halos


def _tile(ref, row0, g: _Geometry, row: int = None, col: int = None):
  """``(P, lanes)`` float32: the instance's tile of an image's halo copy, shifted by
  ``(row, col)`` slots of the window (default: centred, the tile itself). A column
  shift is a sublane roll: the columns it wraps around are masked, and finite."""
  w = g.window
  row = w.rh if row is None else row
  col = w.rw if col is None else col
  x = ref[pl.ds(row0 + row, g.tile)].astype(jnp.float32)
  if col != w.rw:  # x[:, c + col - rw] at column c.
    x = pltpu.roll(x, (w.rw - col) % g.padded_width, axis=1)
  return x.reshape(g.tile * g.padded_width, ref.shape[-1])


def _store(ref, x, g: _Geometry):
  """Writes ``(P, lanes)`` to an output tile: its columns inside the image."""
  ref[...] = x.reshape(g.tile, g.padded_width, -1)[:, :g.width].astype(ref.dtype)


def _forward_kernel(q_ref, k_ref, v_ref, table_ref, out_ref, lse_ref, *, g: _Geometry):
  w, th = g.window, g.tile
  channels = q_ref.shape[-1]
  heads = _heads(channels, g.heads)
  rows, cols = _positions(g)
  row0 = pl.program_id(1) * th
  q = _tile(q_ref, row0, g)

  def window_row(a, carry):
    m, l, acc = carry
    offsets = table_ref[a].astype(jnp.float32)  # (kw, C)
    row_ok = _inside(rows + a - w.rh, g.height)
    for b in range(w.kw):
      k = _tile(k_ref, row0, g, a, b) + offsets[b:b + 1]
      s = g.scale * _per_head(q * k, heads)
      s = jnp.where(row_ok & _inside(cols + b - w.rw, g.width), s, _contract.MASKED_LOGIT)
      m_new = jnp.maximum(m, s)
      correction = jnp.exp(m - m_new)
      p = jnp.exp(s - m_new)
      l = l * correction + p
      acc = acc * _per_channel(correction, heads) + _per_channel(p, heads) * _tile(
          v_ref, row0, g, a, b)
      m = m_new
    return m, l, acc

  positions = th * g.padded_width
  init = (jnp.full((positions, g.heads), -jnp.inf, jnp.float32),
          jnp.zeros((positions, g.heads), jnp.float32),
          jnp.zeros((positions, channels), jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, w.kh, window_row, init)
  _store(out_ref, acc / _per_channel(l, heads), g)
  _store(lse_ref, m + jnp.log(l), g)


def _statistics(ref, row0, g: _Geometry, row: int = None, col: int = None):
  """The log-sum-exp and ``delta`` of a (shifted) tile, ``(P, N)`` each, from the
  ``(..., 2N)`` statistics (one array: a TPU pads every array's lanes to 128)."""
  stats = _tile(ref, row0, g, row, col)
  return stats[:, :g.heads], stats[:, g.heads:]


def _query_kernel(q_ref, do_ref, stats_ref, k_ref, v_ref, table_ref, dq_ref, dtable_ref, *,
                  g: _Geometry):
  """``dq`` of a tile of queries and its share of the relative tables' gradient."""
  w, th = g.window, g.tile
  channels = q_ref.shape[-1]
  heads = _heads(channels, g.heads)
  rows, cols = _positions(g)
  row0 = pl.program_id(1) * th
  q, do = _tile(q_ref, row0, g), _tile(do_ref, row0, g)
  lse, delta = _statistics(stats_ref, row0, g)

  def window_row(a, dq):
    offsets = table_ref[a].astype(jnp.float32)
    row_ok = _inside(rows + a - w.rh, g.height)
    table_grads = []
    for b in range(w.kw):
      k = _tile(k_ref, row0, g, a, b) + offsets[b:b + 1]
      v = _tile(v_ref, row0, g, a, b)
      valid = row_ok & _inside(cols + b - w.rw, g.width)
      p = jnp.where(valid, jnp.exp(g.scale * _per_head(q * k, heads) - lse), 0.0)
      ds = _per_channel(p * (_per_head(do * v, heads) - delta), heads)
      dq = dq + ds * k
      # Queries outside the image are zeros in the halo copy: they add nothing.
      table_grads.append(jnp.sum(ds * q, axis=0, keepdims=True))
    dtable_ref[a] = g.scale * jnp.concatenate(table_grads, axis=0)
    return dq

  dq = jax.lax.fori_loop(0, w.kh, window_row,
                         jnp.zeros((th * g.padded_width, channels), jnp.float32))
  _store(dq_ref, g.scale * dq, g)


def _key_kernel(k_ref, v_ref, q_ref, do_ref, stats_ref, table_ref, dk_ref, dv_ref, *,
                g: _Geometry):
  """``dk`` and ``dv`` of a tile of keys, from the queries whose windows hold them.

  The query that sees key ``(u, c)`` through slot ``(a, b)`` sits at
  ``(u + rh - a, c + rw - b)``: slot ``(kh - 1 - a, kw - 1 - b)`` from the key.
  """
  w, th = g.window, g.tile
  channels = k_ref.shape[-1]
  heads = _heads(channels, g.heads)
  rows, cols = _positions(g)
  row0 = pl.program_id(1) * th
  k0, v = _tile(k_ref, row0, g), _tile(v_ref, row0, g)

  def window_row(a, carry):
    dk, dv = carry
    e = w.kh - 1 - a
    offsets = table_ref[a].astype(jnp.float32)
    row_ok = _inside(rows + w.rh - a, g.height)
    for b in range(w.kw):
      f = w.kw - 1 - b
      q, do = _tile(q_ref, row0, g, e, f), _tile(do_ref, row0, g, e, f)
      lse, delta = _statistics(stats_ref, row0, g, e, f)
      valid = row_ok & _inside(cols + w.rw - b, g.width)
      s = g.scale * _per_head(q * (k0 + offsets[b:b + 1]), heads)
      p = jnp.where(valid, jnp.exp(s - lse), 0.0)
      dv = dv + _per_channel(p, heads) * do
      ds = p * (_per_head(do * v, heads) - delta)
      dk = dk + _per_channel(ds, heads) * q
    return dk, dv

  zeros = jnp.zeros((th * g.padded_width, channels), jnp.float32)
  dk, dv = jax.lax.fori_loop(0, w.kh, window_row, (zeros, zeros))
  _store(dk_ref, g.scale * dk, g)
  _store(dv_ref, dv, g)


# ----------------------------------------------------------------------------- calls


def _hbm_bytes(arrays) -> int:
  """The bytes of ``arrays`` in a TPU's tiled HBM layout, as XLA counts its own ops': the
  minor dimension padded to the 128 lanes, the next to the sublanes (8 of 32 bits)."""
  total = 0
  for x in jax.tree.leaves(arrays):
    *major, rows, lanes = (1,) * (2 - len(x.shape)) + tuple(x.shape)
    sublanes = SUBLANES * max(1, 4 // x.dtype.itemsize)
    total += (math.prod(major) * -(-rows // sublanes) * sublanes * -(-lanes // 128) * 128
              * x.dtype.itemsize)
  return total


def _call(kernel, g: _Geometry, images, others, outputs, cost):
  """The pallas_call of ``kernel`` on ``(B, H, W, lanes)`` ``images`` (read through
  their halo copies, ``_with_halos``) and ``others`` (whole arrays, e.g. the offset
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
      _with_halos(functools.partial(kernel, g=g), len(images), g),
      grid=(images[0].shape[0], g.tiles), in_specs=image_specs + whole_specs,
      out_specs=out_specs, out_shape=shapes, scratch_shapes=halos,
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics,
                                           vmem_limit_bytes=_VMEM_LIMIT_BYTES),
      interpret=pltpu.InterpretParams() if g.interpret else False,
      cost_estimate=pl.CostEstimate(
          flops=cost, transcendentals=cost // 8,
          bytes_accessed=_hbm_bytes(operands) + _hbm_bytes(shapes)))(*operands)


def _flops(g: _Geometry, batch: int, channels: int) -> int:
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
def _attend(q, k, v, table, g: _Geometry):
  """Local attention of ``(B, H, W, C)`` images; ``table`` ``(kh, kw, C)``."""
  return _attend_fwd(q, k, v, table, g)[0]


def _attend_fwd(q, k, v, table, g):
  batch, channels = q.shape[0], q.shape[-1]
  out, lse = _call(_forward_kernel, g, (q, k, v), (table,),
                   (_like(q), _like(q, g.heads, jnp.float32)), _flops(g, batch, channels))
  return out, (q, k, v, table, out, lse)


def _attend_bwd(g: _Geometry, residuals, grad):
  q, k, v, table, out, lse = residuals
  batch, channels = q.shape[0], q.shape[-1]
  flops = 2 * _flops(g, batch, channels)
  # delta = do . out per head: on the lanes as they are (a matmul with the head map; a
  # reshape to (..., N, d) would move the heads to the sublanes, a copy), in float32.
  delta = jnp.einsum("bhwc,cn->bhwn", grad.astype(jnp.float32) * out,
                     _heads(channels, g.heads), precision=jax.lax.Precision.HIGHEST)
  stats = jnp.concatenate([lse, delta], axis=-1)
  dtable = _like(q, dtype=jnp.float32, shape=(batch, g.tiles, *table.shape))
  dq, dtable = _call(
      _query_kernel, g, (q, grad, stats, k, v), (table,),
      (_like(q), (dtable, pl.BlockSpec((None, None, *table.shape),
                                       lambda b, i: (b, i, 0, 0, 0)))), flops)
  dk, dv = _call(_key_kernel, g, (k, v, q, grad, stats), (table,), (_like(k), _like(v)),
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
  g = _Geometry(window, height, width, heads, scale, interpret)
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
  """``_run``, under ``jax.shard_map`` over the batch where a mesh of several devices is
  set (``jax.set_mesh``): a Mosaic kernel runs on each device's share. Inside a
  ``shard_map`` of the caller's (every axis manual), on the shard as it is."""
  assert kwargs["window"].borders == "exclude" and kwargs["window"].dilation == (1, 1)
  mesh = jax.sharding.get_abstract_mesh()
  run = functools.partial(_run, **kwargs)
  if mesh.empty or mesh.size == 1 or mesh.are_all_axes_manual:
    return run(query, key, value, rel_h, rel_w)
  batch = PartitionSpec(mesh.axis_names)
  # check_vma=False: the relative tables' gradient is summed over the devices by
  # shard_map's transpose, rather than in the kernels' custom_vjp.
  return jax.shard_map(run, mesh=mesh, in_specs=(batch, batch, batch, None, None),
                       out_specs=batch, check_vma=False)(query, key, value, rel_h, rel_w)
