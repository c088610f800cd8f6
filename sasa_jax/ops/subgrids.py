"""Dilation reduced to dilation 1: the image's interleaved sub-grids attend separately.

At dilation δ the window of row ``i`` holds only rows of its group ``g = i mod δ``, the
rows ``g, g + δ, g + 2δ, ...`` (``i + δ·s`` with excluded borders; ``(start + s)·δ + g``
with shifted ones). In the group's own coordinates ``i // δ`` that window is the window of
dilation 1, with the same border mode, on the group's sub-grid of ``L`` rows, and it uses
the same slots of the relative tables. So any implementation of dilation 1 computes every
dilation: it runs on each of the ``δh·δw`` sub-grids ``x[:, gh::δh, gw::δw]`` (of at most
two sizes per axis when ``δ`` does not divide the image), whose outputs interleave back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from sasa_jax.ops import _contract

# (query, key, value, *, window, rel_h, rel_w, scale) -> output, at dilation 1.
Attend = Callable[..., jax.Array]


def on_subgrids(attend: Attend, query, key, value, *, window: _contract.Window, rel_h,
                rel_w, scale) -> jax.Array:
  """``attend`` on every sub-grid of ``window.dilation``, interleaved back into
  ``(B, H, W, N, d)``; ``attend`` itself where the dilation is 1."""
  dh, dw = window.dilation
  base = dataclasses.replace(window, dilation=(1, 1))
  if (dh, dw) == (1, 1):
    return attend(query, key, value, window=base, rel_h=rel_h, rel_w=rel_w, scale=scale)
  batch, height, width, heads, depth = query.shape
  rows, cols = math.ceil(height / dh), math.ceil(width / dw)
  grid = []  # grid[gh][gw]: the outputs of sub-grid (gh, gw), padded to (rows, cols).
  for gh in range(dh):
    grid.append([])
    for gw in range(dw):
      out = attend(*(x[:, gh::dh, gw::dw] for x in (query, key, value)), window=base,
                   rel_h=rel_h, rel_w=rel_w, scale=scale)
      pad = [(0, 0), (0, rows - out.shape[1]), (0, cols - out.shape[2]), (0, 0), (0, 0)]
      grid[-1].append(jnp.pad(out, pad))
  # (B, rows, dh, cols, dw, N, d): row r * dh + gh is row r of sub-grid gh.
  stacked = jnp.stack([jnp.stack(row, axis=3) for row in grid], axis=2)
  interleaved = stacked.reshape(batch, rows * dh, cols * dw, heads, depth)
  return interleaved[:, :height, :width]
