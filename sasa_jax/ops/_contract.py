"""The contract every local-attention implementation meets: argument checks and shared math.

Shapes used throughout the ops package:

* ``B`` batch, ``H x W`` image, ``N`` heads, ``d`` head depth;
* ``kh x kw`` the odd window, ``rh = kh // 2`` and ``rw = kw // 2`` its radii.

All checks run on static shapes in Python, so a bad argument raises ``ValueError`` while
tracing, before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Added to the logits of excluded neighbours. Finite, so that a query whose whole window
# is excluded (only padding queries that the blocked implementation discards) softmaxes
# to a uniform distribution instead of NaN, and gradients through it stay finite.
MASKED_LOGIT = -1e30


@dataclasses.dataclass(frozen=True)
class Window:
  """An odd ``kh x kw`` attention window."""

  kh: int
  kw: int

  @property
  def rh(self) -> int:
    return self.kh // 2

  @property
  def rw(self) -> int:
    return self.kw // 2


def as_window(kernel_size: int | Sequence[int]) -> Window:
  """Normalizes ``kernel_size`` (an odd int or a pair of odd ints) to a ``Window``."""
  if isinstance(kernel_size, numbers.Integral) and not isinstance(kernel_size, bool):
    sizes = (int(kernel_size), int(kernel_size))
  elif (isinstance(kernel_size, Sequence) and len(kernel_size) == 2 and all(
      isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in kernel_size)):
    sizes = (int(kernel_size[0]), int(kernel_size[1]))
  else:
    raise ValueError(
        f"kernel_size must be a positive odd int or a pair (kh, kw) of positive odd ints; "
        f"got {kernel_size!r}.")
  if any(s <= 0 or s % 2 == 0 for s in sizes):
    raise ValueError(
        f"kernel_size must be positive and odd in each dimension (1, 3, 5, ...) so that the "
        f"window is centred on its query; got {kernel_size!r}.")
  return Window(*sizes)


def check_arguments(query, key, value, window: Window, rel_h, rel_w, scale):
  """Validates the op's arguments; returns the scale to use (``d**-0.5`` by default)."""
  for name, x in (("query", query), ("key", key), ("value", value)):
    if getattr(x, "ndim", None) != 5:
      raise ValueError(
          f"{name} must have rank 5, shape (B, H, W, N, d) = (batch, height, width, heads, "
          f"head depth); got shape {getattr(x, 'shape', None)}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating-point array; got dtype {x.dtype}.")
  if not query.shape == key.shape == value.shape:
    raise ValueError(
        f"query, key and value must have the same shape (B, H, W, N, d); got "
        f"{query.shape}, {key.shape}, {value.shape}.")
  if not query.dtype == key.dtype == value.dtype:
    raise ValueError(
        f"query, key and value must have the same dtype; got {query.dtype}, {key.dtype}, "
        f"{value.dtype}.")
  d = query.shape[-1]
  if (rel_h is None) != (rel_w is None):
    raise ValueError("rel_h and rel_w must be given together (or both left as None).")
  if rel_h is not None:
    if d % 2:
      raise ValueError(
          f"relative logits split the head depth d into a row half and a column half, so d "
          f"must be even; got d={d}.")
    for name, table, size in (("rel_h", rel_h, window.kh), ("rel_w", rel_w, window.kw)):
      if getattr(table, "shape", None) != (size, d // 2):
        raise ValueError(
            f"{name} must have shape ({'kh' if name == 'rel_h' else 'kw'}, d//2) = "
            f"({size}, {d // 2}) for kernel_size=({window.kh}, {window.kw}) and d={d}; got "
            f"{getattr(table, 'shape', None)}.")
  if scale is None:
    return d**-0.5
  if not isinstance(scale, numbers.Real) or not np.isfinite(scale) or scale <= 0:
    raise ValueError(f"scale must be a positive finite number or None (d**-0.5); got {scale!r}.")
  return float(scale)


def neighbour_mask(size: int, offsets: int, radius: int, start: np.ndarray) -> np.ndarray:
  """Which 1-D neighbours are in the image: ``0 <= start + o - radius < size``.

  Args:
    size: the image extent along this axis.
    offsets: the number of neighbour slots per query along this axis.
    radius: subtracted from the slot index to get the offset from ``start``.
    start: integer array of query positions (any shape).

  Returns:
    bool array of shape ``start.shape + (offsets,)``.
  """
  positions = start[..., None] + np.arange(offsets) - radius
  return (positions >= 0) & (positions < size)


def window_mask(height: int, width: int, window: Window) -> np.ndarray:
  """``(H, W, kh * kw)`` bool: is neighbour ``(a, b)`` of pixel ``(i, j)`` in the image."""
  rows = neighbour_mask(height, window.kh, window.rh, np.arange(height))
  cols = neighbour_mask(width, window.kw, window.rw, np.arange(width))
  mask = rows[:, None, :, None] & cols[None, :, None, :]
  return mask.reshape(height, width, window.kh * window.kw)


def mask_bias(mask: np.ndarray) -> np.ndarray:
  """float32 additive logit bias of a static mask: 0 where kept, ``MASKED_LOGIT`` where
  excluded."""
  return np.where(mask, 0.0, MASKED_LOGIT).astype(np.float32)


def relative_logits(q, rel_h, rel_w):
  """Per-query row and column relative logits.

  Args:
    q: ``(..., d)`` queries.
    rel_h: ``(kh, d/2)`` row-offset embeddings; ``rel_w``: ``(kw, d/2)`` column-offset ones.

  Returns:
    ``(..., kh)`` logits ``q[:d/2] . rel_h[t]`` and ``(..., kw)`` logits
    ``q[d/2:] . rel_w[t]``, in float32.
  """
  half = q.shape[-1] // 2
  rh = jnp.einsum("...c,tc->...t", q[..., :half], rel_h.astype(q.dtype),
                  preferred_element_type=jnp.float32)
  rw = jnp.einsum("...c,tc->...t", q[..., half:], rel_w.astype(q.dtype),
                  preferred_element_type=jnp.float32)
  return rh, rw


def masked_softmax(logits, mask: np.ndarray):
  """Softmax over the last axis in float32, with ``mask == False`` entries excluded.

  ``mask`` is static (numpy), so the exclusion is a constant additive bias: cheaper than a
  select, and nothing to differentiate.
  """
  return jax.nn.softmax(logits.astype(jnp.float32) + mask_bias(mask), axis=-1)
