"""Blocked (HaloNet-style) local attention: dense matmuls over query blocks and their halos.

The image is cut into ``bh x bw`` query blocks. Every query in a block attends to the
block's halo region of ``(bh + kh - 1) x (bw + kw - 1)`` keys through one dense matmul; a
mask keeps exactly each query's ``kh x kw`` window inside the image, so the result is the
same function as ``reference``. Halos are built from shifted views of the padded key and
value blocks (slices and concatenations, whose gradients are pad-and-add), so K and V are
copied ``((b + k - 1) / b)^2`` times rather than ``k^2`` times.

The mask factorises into a row part and a column part (a neighbour is kept iff its row
and its column are both in the query's window and the image), and so does the relative
logit (a row term plus a column term): both are built per axis, from the windows of
``_contract.axis_window``, so either border mode works. With shifted borders a block's
keys reach up to ``kh - 1`` rows beyond it on either side (a window clamped at a border
starts up to ``kh - 1`` rows before its query), so its halo is ``bh + 2 (kh - 1)`` rows.

``dense`` is the same computation with a single block holding the whole image and the
image itself as its halo: the implementation for global attention.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.ops import _contract

DEFAULT_BLOCK_SIZE = 4


def _halo_blocks(x, axis: int, block: int, num_blocks: int, radius: int, halo: int):
  """Cuts ``axis`` of ``x`` into ``num_blocks`` overlapping halo blocks.

  Halo block ``t`` covers positions ``[t * block - radius, t * block - radius + halo)``,
  zero outside ``x``. The result replaces ``axis`` by two axes ``(num_blocks, halo)``.
  """
  extra = math.ceil((halo - block) / block)  # whole blocks that each halo reaches into
  padded_size = (num_blocks + extra) * block
  pad = [(0, 0)] * x.ndim
  pad[axis] = (radius, padded_size - radius - x.shape[axis])
  padded = jnp.pad(x, pad)
  blocks = padded.reshape(*x.shape[:axis], num_blocks + extra, block, *x.shape[axis + 1:])
  shifted = [
      jax.lax.slice_in_dim(blocks, s, s + num_blocks, axis=axis) for s in range(extra + 1)
  ]
  return jax.lax.slice_in_dim(jnp.concatenate(shifted, axis=axis + 1), 0, halo, axis=axis + 1)


def _query_blocks(x, axis: int, block: int, num_blocks: int):
  """Pads ``axis`` to ``num_blocks * block`` and splits it into ``(num_blocks, block)``."""
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, num_blocks * block - x.shape[axis])
  padded = jnp.pad(x, pad)
  return padded.reshape(*x.shape[:axis], num_blocks, block, *x.shape[axis + 1:])


def _axis_geometry(axis: _contract.AxisWindow, block: int, halo: int, key_origin: int):
  """Static per-axis tables for one image axis.

  Query ``q`` of block ``t`` sits at ``t * block + q``; halo slot ``h`` of that block holds
  the key at ``t * block + key_origin + h``.

  Returns:
    mask: ``(num_blocks, block, halo)`` bool, the key is in the query's window (and so
      inside the image).
    row_onehot: ``(num_blocks, block, halo, table rows)`` float32, one-hot of the
      relative table's row that the key uses, zero where it is not in the window.
  """
  size = len(axis.keys)
  num_blocks = math.ceil(size / block)
  queries = np.minimum(np.arange(num_blocks * block), size - 1)  # Padding: the last.
  keys = (np.arange(num_blocks)[:, None] * block + key_origin + np.arange(halo)[None, :])
  # (blocks, block, halo, kernel): slot s of the query's window is this halo key.
  match = ((axis.keys[queries].reshape(num_blocks, block, 1, -1) ==
            keys[:, None, :, None]) &
           axis.inside[queries].reshape(num_blocks, block, 1, -1))
  rows = axis.rows[queries].reshape(num_blocks, block, 1, -1, 1)
  row_onehot = (match[..., None] & (rows == np.arange(axis.table_rows))).any(axis=3)
  return match.any(axis=-1), row_onehot.astype(np.float32)


def _attend_blocks(q, k, v, rows, cols, rel_h, rel_w, scale):
  """Dense attention of query blocks over key blocks, masked to each query's window.

  Args:
    q: ``(B, nh, nw, N, bh, bw, d)`` query blocks.
    k, v: ``(B, nh, nw, N, lh, lw, d)`` the keys and values each query block may see.
    rows, cols: ``_axis_geometry`` of the row and column axes.
    rel_h, rel_w, scale: as in ``local_attention``.

  Returns:
    ``(B, nh, nw, N, bh, bw, d)`` float32.
  """
  (mask_h, onehot_h), (mask_w, onehot_w) = rows, cols
  lh, lw = k.shape[4:6]
  logits = jnp.einsum("bxynqrd,bxynhwd->bxynqrhw", q, k, preferred_element_type=jnp.float32)
  if rel_h is not None:
    logit_h, logit_w = _contract.relative_logits(q, rel_h, rel_w)  # (..., bh, bw, rows)
    logit_h = jnp.einsum("bxynqrt,xqht->bxynqrh", logit_h, onehot_h)
    logit_w = jnp.einsum("bxynqrt,yrwt->bxynqrw", logit_w, onehot_w)
    logits = logits + logit_h[..., :, None] + logit_w[..., None, :]
  # (nh, 1, 1, bh, 1, lh, 1) & (1, nw, 1, 1, bw, 1, lw) -> (nh, nw, 1, bh, bw, lh, lw)
  mask = mask_h[:, None, None, :, None, :, None] & mask_w[None, :, None, None, :, None, :]
  probs = _contract.masked_softmax(
      scale * logits.reshape(logits.shape[:-2] + (lh * lw,)),
      mask.reshape(mask.shape[:-2] + (lh * lw,)))
  return jnp.einsum("bxynqrk,bxynkd->bxynqrd", probs.astype(v.dtype),
                    v.reshape(v.shape[:4] + (lh * lw, v.shape[-1])),
                    preferred_element_type=jnp.float32)


def _unblock(out, height: int, width: int, dtype):
  """``(B, nh, nw, N, bh, bw, d)`` -> ``(B, H, W, N, d)``, cropping block padding."""
  batch, nh, nw, heads, bh, bw, depth = out.shape
  out = out.transpose(0, 1, 4, 2, 5, 3, 6).reshape(batch, nh * bh, nw * bw, heads, depth)
  return out[:, :height, :width].astype(dtype)


def blocked(query, key, value, *, window, rel_h, rel_w, scale,
            block_size: int = DEFAULT_BLOCK_SIZE):
  """Blocked local attention; same contract as ``reference``.

  Blocks are ``min(block_size, H) x min(block_size, W)``; H and W need not divide them.
  """
  _, height, width, _, _ = query.shape
  bh, bw = min(block_size, height), min(block_size, width)
  nh, nw = math.ceil(height / bh), math.ceil(width / bw)
  # How far a block's keys reach before it (after it likewise).
  if window.borders == "shift":
    reach_h, reach_w = window.kh - 1, window.kw - 1
  else:
    reach_h, reach_w = window.rh, window.rw
  lh, lw = bh + 2 * reach_h, bw + 2 * reach_w

  # (B, nh, bh, nw, bw, N, d) -> (B, nh, nw, N, bh, bw, d)
  q = _query_blocks(_query_blocks(query, 1, bh, nh), 3, bw, nw).transpose(0, 1, 3, 5, 2, 4, 6)

  def halos(x):  # (B, H, W, N, d) -> (B, nh, nw, N, lh, lw, d)
    rows = _halo_blocks(x, 1, bh, nh, reach_h, lh)
    return _halo_blocks(rows, 3, bw, nw, reach_w, lw).transpose(0, 1, 3, 5, 2, 4, 6)

  axis_h, axis_w = window.axes(height, width)
  out = _attend_blocks(q, halos(key), halos(value),
                       _axis_geometry(axis_h, bh, lh, -reach_h),
                       _axis_geometry(axis_w, bw, lw, -reach_w), rel_h, rel_w, scale)
  return _unblock(out, height, width, query.dtype)


def dense(query, key, value, *, window, rel_h, rel_w, scale):
  """Every query against every pixel of the image, masked to its window.

  ``H*W x H*W`` logits: the implementation for global attention (a window of at least
  ``(2H - 1) x (2W - 1)``) and for windows that cover most of a small image.
  """
  _, height, width, _, _ = query.shape

  def one_block(x):  # (B, H, W, N, d) -> (B, 1, 1, N, H, W, d)
    return x.transpose(0, 3, 1, 2, 4)[:, None, None]

  axis_h, axis_w = window.axes(height, width)
  out = _attend_blocks(one_block(query), one_block(key), one_block(value),
                       _axis_geometry(axis_h, height, height, 0),
                       _axis_geometry(axis_w, width, width, 0), rel_h, rel_w, scale)
  return _unblock(out, height, width, query.dtype)
