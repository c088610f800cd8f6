"""Attention maps of SASA layers and the attention stem, for visualisation.

Every ``LocalSelfAttention`` sows its softmax probabilities ``attention_weights``
``(B, H, W, N, kh, kw)`` into the ``intermediates`` collection when that collection is
mutable (``ops.attention_weights``: entry ``[b, i, j, n, a, c]`` is the weight that head
``n`` of output pixel ``(i, j)`` gives to input pixel ``(i + a - kh//2, j + c - kw//2)``,
zero outside the image). ``AttentionStem`` sows its block attention in the same format,
in a ``(2 * block_size - 1)``-square window centred on each pixel (the smallest that
holds the pixel's block wherever the pixel sits in it), zero outside the pixel's block;
its maps are on the image grid. This module collects them from a layer or a whole model
and turns a pixel's window into a map over the feature grid, ready to draw over the
image::

    from sasa_jax import attention_maps, models

    model = models.create("sasa_tiny")
    variables = model.init(rng, images, train=False)
    maps = attention_maps.collect(model, variables, images, train=False)
    # {'stage1_block1/attention': (B, 8, 8, 4, 5, 5), 'stage2_block1/attention': ...}
    heat = attention_maps.pixel_map(maps["stage1_block1/attention"][0], 3, 4)  # (8, 8, 4)
    # heat[..., n]: where head n of pixel (3, 4) looks; sums to 1 over the image.

A layer with ``stride > 1`` attends at its input resolution and average-pools afterwards,
so its weights are on its *input* grid. Layers deep in a model run on a coarser grid than
the image: ``feature_pixel`` maps an image pixel to the grid, ``upsample`` maps a map back
to the image's size. Computing the weights holds a ``kh * kw``-fold copy of the keys: this
is for inspecting a few images, not for training.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

COLLECTION = "intermediates"
NAME = "attention_weights"

__all__ = ["apply_with_attention", "collect", "feature_pixel", "pixel_map", "upsample"]


def _with_intermediates(mutable: Any) -> Any:
  """``mutable`` (as ``Module.apply`` takes it) plus the ``intermediates`` collection."""
  if mutable is True:
    return True
  if mutable is False or mutable is None:
    return [COLLECTION]
  if isinstance(mutable, str):
    mutable = [mutable]
  mutable = list(mutable)
  return mutable if COLLECTION in mutable else mutable + [COLLECTION]


def _gather(tree: Mapping[str, Any], prefix: tuple[str, ...],
            out: dict[str, jax.Array]) -> None:
  for name, value in tree.items():
    if name == NAME and isinstance(value, tuple):
      path = "/".join(prefix)
      if len(value) == 1:
        out[path] = value[0]
      else:  # A layer called several times (shared weights): one entry per call.
        out.update({f"{path}#{call}": weights for call, weights in enumerate(value)})
    elif isinstance(value, Mapping):
      _gather(value, prefix + (name,), out)


def apply_with_attention(module, variables: Mapping[str, Any], *args,
                         **apply_kwargs) -> tuple[Any, dict[str, jax.Array]]:
  """``module.apply(variables, *args, **apply_kwargs)`` and its attention weights.

  Args:
    module: a linen module containing ``LocalSelfAttention`` or ``AttentionStem`` layers
      (or one itself), e.g. ``models.create('sasa_tiny')``.
    variables: its variables (``params`` and, for models, ``batch_stats``). An
      ``intermediates`` collection in them is ignored, so that nothing is counted twice.
    *args: the module's inputs, e.g. ``images`` ``(B, H, W, C)``.
    **apply_kwargs: passed to ``module.apply``, e.g. ``train=False`` for the models. A
      ``mutable`` argument is honoured, but the updated collections are not returned.

  Returns:
    ``(output, weights)``: the module's output (exactly what ``apply`` returns without
    ``mutable``) and ``{path: (B, H, W, N, kh, kw) float32}`` for every call of a
    ``LocalSelfAttention`` or ``AttentionStem``, keyed by module path
    (``'stem_attention'``, ``'stage2_block1/attention'``; ``''`` for the module itself;
    ``'path#k'`` for the ``k``-th call of a layer called more than once), in call order.
    Works under ``jax.jit``.
  """
  variables = {name: tree for name, tree in variables.items() if name != COLLECTION}
  mutable = _with_intermediates(apply_kwargs.pop("mutable", False))
  output, state = module.apply(variables, *args, mutable=mutable, **apply_kwargs)
  weights: dict[str, jax.Array] = {}
  _gather(state.get(COLLECTION, {}), (), weights)
  return output, weights


def collect(module, variables: Mapping[str, Any], *args,
            **apply_kwargs) -> dict[str, jax.Array]:
  """The attention weights of every attention layer of ``module`` on the given inputs.

  ``{module path: (B, H, W, N, kh, kw)}``; see ``apply_with_attention`` for the
  arguments. Example: ``collect(model, variables, images, train=False)``.
  """
  return apply_with_attention(module, variables, *args, **apply_kwargs)[1]


def _check_index(name: str, index: int, size: int) -> int:
  if not isinstance(index, int) or isinstance(index, bool):
    raise TypeError(f"{name} must be an int; got {index!r}.")
  if not -size <= index < size:
    raise ValueError(f"{name}={index} is outside the feature grid of size {size}.")
  return index % size


def pixel_map(weights: jax.Array, i: int, j: int) -> jax.Array:
  """Where pixel ``(i, j)`` looks: its window probabilities placed on the feature grid.

  Args:
    weights: ``(..., H, W, N, kh, kw)`` attention weights, e.g. one image's
      ``(H, W, N, kh, kw)`` or a batch's ``(B, H, W, N, kh, kw)``, as collected (from an
      ``AttentionStem``, the map is zero outside the pixel's block).
    i, j: the query pixel's row and column on the ``H x W`` grid (negative indices count
      from the end).

  Returns:
    ``(..., H, W, N)``: entry ``[a, b, n]`` is the weight head ``n`` of pixel ``(i, j)``
    gives to pixel ``(a, b)``; zero outside its window. Near a border the part of the
    window that falls outside the image is dropped: it carries no probability (masked in
    the softmax), so each head's map still sums to 1 over the image.
  """
  weights = jnp.asarray(weights)
  if weights.ndim < 5:
    raise ValueError(
        f"weights must have shape (..., H, W, N, kh, kw) (as collected from a "
        f"LocalSelfAttention or AttentionStem); got shape {weights.shape}.")
  height, width, _, kh, kw = weights.shape[-5:]
  i = _check_index("i", i, height)
  j = _check_index("j", j, width)
  window = weights[..., i, j, :, :, :]  # (..., N, kh, kw)
  lead = [(0, 0)] * (window.ndim - 2)
  # Window row r is image row i + r - kh//2: pad the window into a (H + kh - 1) grid
  # offset by kh//2 (window row r at grid row i + r), then crop the image's rows.
  canvas = jnp.pad(window, lead + [(i, height - 1 - i), (j, width - 1 - j)])
  grid = canvas[..., kh // 2:kh // 2 + height, kw // 2:kw // 2 + width]  # (..., N, H, W)
  return jnp.moveaxis(grid, -3, -1)


def feature_pixel(pixel: Sequence[int], image_shape: Sequence[int],
                  grid_shape: Sequence[int]) -> tuple[int, int]:
  """The cell of an ``(h, w)`` feature grid that covers image pixel ``(row, col)``.

  ``image_shape`` and ``grid_shape`` are ``(H, W)`` and ``(h, w)`` (extra trailing
  entries, e.g. channels, are ignored). For a layer behind a stride-4 stem on a 64x64
  image (a 16x16 grid), pixel (37, 10) is in cell (9, 2).
  """
  (row, col), (height, width), (h, w) = pixel, image_shape[:2], grid_shape[:2]
  row = _check_index("row", row, height)
  col = _check_index("col", col, width)
  return row * h // height, col * w // width


def upsample(maps: jax.Array, shape: Sequence[int], method: str = "nearest") -> jax.Array:
  """Resizes ``(..., h, w, N)`` maps (e.g. from ``pixel_map``) to ``(..., H, W, N)``.

  For drawing a coarse layer's map over the image: with ``'nearest'`` (the default) and
  an integer factor ``f = H / h``, each grid cell becomes the ``f x f`` block of image
  pixels it covers, so the map sums to ``f**2`` instead of 1 (divide by it to keep a
  distribution). ``method`` is any of ``jax.image.resize``'s (``'linear'``, ``'cubic'``,
  ...) for smoother pictures. ``shape`` is ``(H, W)``; extra entries are ignored.
  """
  maps = jnp.asarray(maps)
  if maps.ndim < 3:
    raise ValueError(f"maps must have shape (..., h, w, N); got shape {maps.shape}.")
  height, width = shape[:2]
  return jax.image.resize(maps, maps.shape[:-3] + (height, width, maps.shape[-1]), method)
