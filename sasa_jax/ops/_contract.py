"""The contract every local-attention implementation meets: argument checks and shared math.

Shapes used throughout the ops package:

* ``B`` batch, ``H x W`` image, ``N`` heads, ``d`` head depth;
* ``kh x kw`` the odd window, ``rh = kh // 2`` and ``rw = kw // 2`` its radii;
* ``dh, dw`` the dilation, the distance between the window's pixels along each axis.

The window of a query along one axis (rows; columns work the same way), at dilation δ:

* ``borders='exclude'`` (SASA's): the neighbours of row ``i`` are ``i + δ·s`` for
  ``s = -kh//2 .. kh//2``, those inside the image; ``rel_h`` has ``kh`` rows and offset
  ``s`` uses row ``s + kh//2``.
* ``borders='shift'`` (neighbourhood attention, as NATTEN defines it): row ``i`` belongs
  to the dilation group ``g = i mod δ``, whose ``L`` positions ``g, g + δ, ...`` are inside
  the image; in group coordinates ``i' = i // δ`` the window starts at
  ``start = clamp(i' - kh//2, 0, L - kh)`` and its keys are the rows ``(start + s)·δ + g``
  for ``s = 0 .. kh-1``, all inside the image; ``rel_h`` has ``2·kh - 1`` rows and key
  ``start + s`` uses row ``start + s - i' + kh - 1``. Needs ``H >= kh·δ``.

:func:`axis_window` tabulates this, the one definition that ``reference`` and every
static mask follow. All checks run on static shapes in Python, so a bad argument raises
``ValueError`` while tracing, before anything is compiled.
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


BORDERS = ("exclude", "shift")


@dataclasses.dataclass(frozen=True)
class Window:
  """An odd ``kh x kw`` attention window, its ``dilation`` ``(dh, dw)`` and what happens
  at the borders (one of ``BORDERS``). Only ``reference`` takes a dilation above 1; for
  the others it is reduced to dilation 1 on sub-grids first (``sasa_jax.ops.subgrids``)."""

  kh: int
  kw: int
  borders: str = "exclude"
  dilation: tuple[int, int] = (1, 1)

  def axes(self, height: int, width: int) -> tuple[AxisWindow, AxisWindow]:
    """The :class:`AxisWindow` of the rows and of the columns of an ``H x W`` image."""
    return (axis_window(height, self.kh, self.dilation[0], self.borders),
            axis_window(width, self.kw, self.dilation[1], self.borders))

  @property
  def rh(self) -> int:
    return self.kh // 2

  @property
  def rw(self) -> int:
    return self.kw // 2

  @property
  def table_rows(self) -> tuple[int, int]:
    """The rows of ``rel_h`` and ``rel_w``: the offsets a key can have from its query."""
    if self.borders == "shift":
      return 2 * self.kh - 1, 2 * self.kw - 1
    return self.kh, self.kw


def as_window(kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
              borders: str = "exclude") -> Window:
  """The ``Window`` of ``kernel_size`` (an odd int or a pair of odd ints), ``dilation``
  (``as_dilation``) and ``borders`` (one of ``BORDERS``)."""
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
  check_borders(borders)
  return Window(*sizes, borders=borders, dilation=as_dilation(dilation))


def as_dilation(dilation: int | Sequence[int]) -> tuple[int, int]:
  """``(dh, dw)`` of ``dilation`` (an int >= 1, or a pair of them)."""
  if isinstance(dilation, numbers.Integral) and not isinstance(dilation, bool):
    dilation = (int(dilation), int(dilation))
  if (isinstance(dilation, Sequence) and len(dilation) == 2 and all(
      isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 1
      for d in dilation)):
    return int(dilation[0]), int(dilation[1])
  raise ValueError(f"dilation must be an int >= 1 or a pair (dh, dw) of them; got "
                   f"{dilation!r}.")


def check_borders(borders: str) -> None:
  if borders not in BORDERS:
    raise ValueError(f"borders must be one of {list(BORDERS)}; got {borders!r}.")


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
  if window.borders == "shift":
    for axis, size, kernel, step in (("height", query.shape[1], window.kh, window.dilation[0]),
                                     ("width", query.shape[2], window.kw, window.dilation[1])):
      if size < kernel * step:
        raise ValueError(
            f"borders='shift' keeps every window inside the image, so the image {axis} "
            f"must be at least kernel_size * dilation = {kernel} * {step} = "
            f"{kernel * step}; got {axis} {size}.")
  if (rel_h is None) != (rel_w is None):
    raise ValueError("rel_h and rel_w must be given together (or both left as None).")
  if rel_h is not None:
    if d % 2:
      raise ValueError(
          f"relative logits split the head depth d into a row half and a column half, so d "
          f"must be even; got d={d}.")
    rows_h, rows_w = window.table_rows
    for name, table, size in (("rel_h", rel_h, rows_h), ("rel_w", rel_w, rows_w)):
      if getattr(table, "shape", None) != (size, d // 2):
        k = "kh" if name == "rel_h" else "kw"
        rows = f"2*{k}-1" if window.borders == "shift" else k
        raise ValueError(
            f"{name} must have shape ({rows}, d//2) = ({size}, {d // 2}) for "
            f"kernel_size=({window.kh}, {window.kw}), borders={window.borders!r} and d={d}; "
            f"got {getattr(table, 'shape', None)}.")
  if scale is None:
    return d**-0.5
  if not isinstance(scale, numbers.Real) or not np.isfinite(scale) or scale <= 0:
    raise ValueError(f"scale must be a positive finite number or None (d**-0.5); got {scale!r}.")
  return float(scale)


@dataclasses.dataclass(frozen=True)
class AxisWindow:
  """Every query's window along one axis of ``size`` positions (static numpy tables).

  Attributes:
    keys: ``(size, kernel)`` int: the position of slot ``s`` of query ``i``'s window
      (clipped into the image where it is outside).
    inside: ``(size, kernel)`` bool: that position is inside the image (always, with
      ``borders='shift'``).
    rows: ``(size, kernel)`` int: the row of the relative table slot ``s`` uses.
    table_rows: the relative table's rows (``kernel``, or ``2 * kernel - 1``).
  """

  keys: np.ndarray
  inside: np.ndarray
  rows: np.ndarray
  table_rows: int


def axis_window(size: int, kernel: int, dilation: int = 1, borders: str = "exclude"
                ) -> AxisWindow:
  """The windows of every position of an axis; the module docstring defines them."""
  i = np.arange(size)[:, None]
  s = np.arange(kernel)[None, :]
  radius = kernel // 2
  if borders == "exclude":
    keys = i + dilation * (s - radius)
    inside = (keys >= 0) & (keys < size)
    return AxisWindow(np.clip(keys, 0, size - 1), inside,
                      np.broadcast_to(s, (size, kernel)).copy(), kernel)
  group, position = i % dilation, i // dilation
  length = (size - group + dilation - 1) // dilation  # Positions of each query's group.
  start = np.clip(position - radius, 0, length - kernel)
  keys = (start + s) * dilation + group
  return AxisWindow(keys, np.ones((size, kernel), bool), start + s - position + kernel - 1,
                    2 * kernel - 1)


def window_mask(height: int, width: int, window: Window) -> np.ndarray:
  """``(H, W, kh * kw)`` bool: is slot ``(a, b)`` of pixel ``(i, j)`` in the image."""
  rows, cols = window.axes(height, width)
  mask = rows.inside[:, None, :, None] & cols.inside[None, :, None, :]
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
