"""The Pallas kernel programs of fused local attention (``ops.fused`` calls them), and the
tiled layout they read.

Each kernel instance owns one ``tile`` of queries (or keys) of one (image, head) plane and
walks the ``kh x kw`` window offsets: for window row ``a`` (a loop) and column ``b``
(unrolled), it loads the tile of keys shifted by ``(a - rh, b - rw)`` from a plane padded by
the window's radius, forms the ``tile`` logits, and folds them into a running (online)
softmax:

* forward: ``out`` and ``lse`` per query tile;
* backward, query side: ``dq`` (content part), ``delta = sum(dO * out)`` and the
  per-query sums of the logit gradients over each window row and column;
* backward, key side: each key tile visits the ``kh x kw`` query tiles that see it (the
  same shifts, mirrored) and accumulates ``dk`` and ``dv`` without atomics.

Logits, softmax and accumulation are float32 (elementwise products, so no TF32 rounding on
GPUs). The head depth is zero-padded to a power of two and the planes to whole tiles.
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
class Geometry:
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


def pad_spatial(x, geometry: Geometry, halo: bool, axis: int = 1):
  """Pads ``x``'s spatial axes ``axis, axis + 1`` (extent ``H, W``) to whole tiles, and by
  the window's radius on both sides when ``halo``."""
  (hq, wq), w = geometry.tiled, geometry.window
  rh, rw = (w.rh, w.rw) if halo else (0, 0)
  pad = [(0, 0)] * x.ndim
  pad[axis] = (rh, hq - geometry.height + rh)
  pad[axis + 1] = (rw, wq - geometry.width + rw)
  return jnp.pad(x, pad)


def pad_plane(x, geometry: Geometry, halo: bool):
  """``pad_spatial`` of ``(P, H, W, d)`` planes, with ``d`` padded to a power of two."""
  x = pad_spatial(x, geometry, halo)
  return jnp.pad(x, [(0, 0)] * 3 + [(0, pl.next_power_of_2(x.shape[-1]) - x.shape[-1])])


def crop(x, geometry: Geometry, depth: int):
  """``(P, Hq, Wq, dp)`` -> ``(P, H, W, depth)``."""
  return x[:, :geometry.height, :geometry.width, :depth]


def tile_spec(geometry: Geometry, *trailing: int):
  """BlockSpec of one ``(th, tw, *trailing)`` tile of a tile-padded ``(P, Hq, Wq, ...)``."""
  th, tw = geometry.tile
  return pl.BlockSpec((None, th, tw, *trailing), lambda p, i, j: (p, i, j) + (0,) * len(
      trailing))


def planes_spec(geometry: Geometry, *leading: int):
  """BlockSpec of one ``(*leading, th, tw)`` tile of a ``(P, *leading, Hq, Wq)`` array."""
  th, tw = geometry.tile
  return pl.BlockSpec((None, *leading, th, tw), lambda p, i, j: (p,) + (0,) * len(leading) +
                      (i, j))


def whole_spec(shape):
  """BlockSpec of a whole ``shape[1:]`` plane (the kernel slices it itself)."""
  return pl.BlockSpec((None, *shape[1:]), lambda p, i, j: (p,) + (0,) * (len(shape) - 1))


def pallas_call(kernel, geometry: Geometry, planes: int, in_specs, out_specs, out_shape):
  compiler_params = None
  if not geometry.interpret:
    from jax.experimental.pallas import triton as plgpu  # pylint: disable=g-import-not-at-top
    compiler_params = plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=1)
  return pl.pallas_call(kernel, grid=(planes, *geometry.tiles), in_specs=in_specs,
                        out_specs=out_specs, out_shape=out_shape,
                        compiler_params=compiler_params, interpret=geometry.interpret)


# ---------------------------------------------------------------------------- kernels


def _origin(geometry: Geometry):
  """Image row and column of this instance's tile's first pixel.

  Read once at the kernel's top level: Pallas's interpret mode resolves ``program_id``
  only there, not inside loop bodies.
  """
  th, tw = geometry.tile
  return pl.program_id(1) * th, pl.program_id(2) * tw


def _positions(origin, geometry: Geometry):
  """Image rows ``(th, 1)`` and columns ``(1, tw)`` of the tile at ``origin``."""
  th, tw = geometry.tile
  return origin[0] + jnp.arange(th)[:, None], origin[1] + jnp.arange(tw)[None, :]


def _inside(positions, size: int):
  return (positions >= 0) & (positions < size)


def _shifted(ref, origin, geometry: Geometry, row, col, *leading):
  """The ``(th, tw, ...)`` tile of a halo-padded plane ``ref[*leading]``, shifted by
  ``(row, col)`` slots from the tile at ``origin``."""
  th, tw = geometry.tile
  return ref[(*leading, pl.ds(origin[0] + row, th), pl.ds(origin[1] + col, tw))]


def _logits(q, k, row_term, col_term, valid, geometry: Geometry):
  """``scale * (q . k + row_term + col_term)`` per query, ``MASKED_LOGIT`` where invalid."""
  s = jnp.sum(q * k, axis=-1)
  if row_term is not None:
    s = s + row_term + col_term
  return jnp.where(valid, geometry.scale * s, _contract.MASKED_LOGIT)


def forward_kernel(*refs, geometry: Geometry, relative: bool):
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


def backward_query_kernel(*refs, geometry: Geometry, relative: bool):
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


def backward_key_kernel(*refs, geometry: Geometry, relative: bool):
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
