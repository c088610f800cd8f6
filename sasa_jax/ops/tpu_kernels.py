"""The Pallas TPU (Mosaic) kernel programs of local attention (``ops.tpu`` calls them).

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

Logits, softmax and accumulation are float32 (inputs may be bfloat16). Every kernel reads
its images through a VMEM copy with the window's halo (``with_halos``: zero rows; the
columns wrap around as they roll, masked), made once per image.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sasa_jax.ops import _contract

TILE_ROWS = 8
SUBLANES = 8


@dataclasses.dataclass(frozen=True)
class Geometry:
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


def head_map(channels: int, heads: int) -> jax.Array:
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


def _instance(g: Geometry, channels: int):
  """What a kernel instance needs to know of itself: the ``(C, N)`` head map, its first
  image row, and the image row and column of each query of its tile (its ``P`` queries
  row-major), ``(P, N)`` each."""
  row0 = pl.program_id(1) * g.tile
  index = jax.lax.broadcasted_iota(jnp.int32, (g.tile * g.padded_width, g.heads), 0)
  row = jax.lax.div(index, g.padded_width)  # Not //: see head_map.
  return head_map(channels, g.heads), row0, row0 + row, index - row * g.padded_width


def _inside(position, size):
  return (position >= 0) & (position < size)


def with_halos(kernel, images: int, g: Geometry):
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


def _tile(ref, row0, g: Geometry, row: int = None, col: int = None):
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


def _store(ref, x, g: Geometry):
  """Writes ``(P, lanes)`` to an output tile: its columns inside the image."""
  ref[...] = x.reshape(g.tile, g.padded_width, -1)[:, :g.width].astype(ref.dtype)


def forward_kernel(q_ref, k_ref, v_ref, table_ref, out_ref, lse_ref, *, g: Geometry):
  w, th = g.window, g.tile
  channels = q_ref.shape[-1]
  heads, row0, rows, cols = _instance(g, channels)
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


def _statistics(ref, row0, g: Geometry, row: int = None, col: int = None):
  """The log-sum-exp and ``delta`` of a (shifted) tile, ``(P, N)`` each, from the
  ``(..., 2N)`` statistics (one array: a TPU pads every array's lanes to 128)."""
  stats = _tile(ref, row0, g, row, col)
  return stats[:, :g.heads], stats[:, g.heads:]


def query_kernel(q_ref, do_ref, stats_ref, k_ref, v_ref, table_ref, dq_ref, dtable_ref, *,
                 g: Geometry):
  """``dq`` of a tile of queries and its share of the relative tables' gradient."""
  w, th = g.window, g.tile
  channels = q_ref.shape[-1]
  heads, row0, rows, cols = _instance(g, channels)
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


def key_kernel(k_ref, v_ref, q_ref, do_ref, stats_ref, table_ref, dk_ref, dv_ref, *,
               g: Geometry):
  """``dk`` and ``dv`` of a tile of keys, from the queries whose windows hold them.

  The query that sees key ``(u, c)`` through slot ``(a, b)`` sits at
  ``(u + rh - a, c + rw - b)``: slot ``(kh - 1 - a, kw - 1 - b)`` from the key.
  """
  w, th = g.window, g.tile
  channels = k_ref.shape[-1]
  heads, row0, rows, cols = _instance(g, channels)
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
