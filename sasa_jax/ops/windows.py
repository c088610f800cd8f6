"""Window-gathering implementations: every query's ``kh x kw`` memory block is materialised.

``reference`` gathers each query's window by the static index tables of
``_contract.axis_window`` (any dilation, either border mode): the plainest correct
version, the ground truth of the tests. ``patches`` extracts the windows with
``jax.lax.conv_general_dilated_patches`` (one fused op; excluded borders only), whose
plain gradient is a transposed one-hot convolution and very slow on CPU, so it carries a
``custom_vjp`` that folds the window gradients back with pad-and-add.

Both hold a ``kh * kw``-fold copy of K and V: they are for checking and small windows, not
the default path.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.ops import _contract


def _window_probs(query, key_windows, window, rel_h, rel_w, scale):
  """Attention probabilities of each query over its materialised window.

  Args:
    query: ``(B, H, W, N, d)``.
    key_windows: ``(B, H, W, N, d, kh * kw)``: slot ``a * kw + b`` of pixel ``(i, j)``
      holds the key of that slot of its window (anything where the slot is outside the
      image: it is masked).
    window: the ``Window``; rel_h, rel_w, scale: as in ``local_attention``.

  Returns:
    ``(B, H, W, N, kh * kw)`` float32, zero for slots outside the image.
  """
  _, height, width, _, _ = query.shape
  logits = jnp.einsum("bhwnd,bhwndk->bhwnk", query, key_windows,
                      preferred_element_type=jnp.float32)
  if rel_h is not None:
    rows, cols = window.axes(height, width)
    logit_h, logit_w = _contract.relative_logits(query, rel_h, rel_w)  # (..., table rows)
    logit_h = jnp.take_along_axis(logit_h, rows.rows[None, :, None, None, :], axis=-1)
    logit_w = jnp.take_along_axis(logit_w, cols.rows[None, None, :, None, :], axis=-1)
    positional = logit_h[..., :, None] + logit_w[..., None, :]
    logits = logits + positional.reshape(logits.shape)
  mask = _contract.window_mask(height, width, window)[None, :, :, None, :]
  return _contract.masked_softmax(scale * logits, mask)


def _attend_windows(query, key_windows, value_windows, window, rel_h, rel_w, scale):
  """``_window_probs``-weighted sum of ``value_windows``; ``(B, H, W, N, d)``."""
  probs = _window_probs(query, key_windows, window, rel_h, rel_w, scale)
  out = jnp.einsum("bhwnk,bhwndk->bhwnd", probs.astype(value_windows.dtype), value_windows,
                   preferred_element_type=jnp.float32)
  return out.astype(query.dtype)


def _gathered_windows(x, window: _contract.Window):
  """``(B, H, W, N, d)`` -> ``(B, H, W, N, d, kh * kw)``: each pixel's window, gathered
  by the window's index tables."""
  batch, height, width, heads, depth = x.shape
  rows, cols = window.axes(height, width)
  x = jnp.take(x, rows.keys.reshape(-1), axis=1)  # (B, H * kh, W, N, d)
  x = jnp.take(x, cols.keys.reshape(-1), axis=2)  # (B, H * kh, W * kw, N, d)
  x = x.reshape(batch, height, window.kh, width, window.kw, heads, depth)
  return x.transpose(0, 1, 3, 5, 6, 2, 4).reshape(batch, height, width, heads, depth, -1)


def reference(query, key, value, *, window, rel_h, rel_w, scale):
  """The plainest correct implementation: gathered windows, masked softmax. Any dilation
  and either border mode."""
  return _attend_windows(query, _gathered_windows(key, window),
                         _gathered_windows(value, window), window, rel_h, rel_w, scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _extract_patches(x, kh: int, kw: int):
  """``(B, H, W, C)`` -> ``(B, H, W, C, kh * kw)`` zero-padded ``kh x kw`` patches."""
  patches = jax.lax.conv_general_dilated_patches(
      x, filter_shape=(kh, kw), window_strides=(1, 1),
      padding=((kh // 2, kh // 2), (kw // 2, kw // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      # The patches are a one-hot convolution: it must not round through TF32/bf16 passes.
      precision=jax.lax.Precision.HIGHEST)
  return patches.reshape(*x.shape, kh * kw)


def _extract_patches_fwd(x, kh, kw):
  return _extract_patches(x, kh, kw), None


def _extract_patches_bwd(kh, kw, _, grad):
  """Folds window gradients back: each window slot adds into its shifted pixel."""
  _, height, width, _, _ = grad.shape
  folded = jnp.zeros((grad.shape[0], height + kh - 1, width + kw - 1, grad.shape[3]),
                     grad.dtype)
  for a in range(kh):
    for b in range(kw):
      folded = folded.at[:, a:a + height, b:b + width].add(grad[..., a * kw + b])
  return (folded[:, kh // 2:kh // 2 + height, kw // 2:kw // 2 + width],)


_extract_patches.defvjp(_extract_patches_fwd, _extract_patches_bwd)


def _patch_windows(x, window: _contract.Window):
  """``(B, H, W, N, d)`` -> ``(B, H, W, N, d, kh * kw)`` with one patches op."""
  batch, height, width, heads, depth = x.shape
  flat = x.reshape(batch, height, width, heads * depth)
  patches = _extract_patches(flat, window.kh, window.kw)
  return patches.reshape(batch, height, width, heads, depth, window.kh * window.kw)


def window_probs(query, key, *, window, rel_h, rel_w, scale):
  """``(B, H, W, N, eh, ew)`` float32 attention probabilities, for inspection, in a window
  centred on each query that holds every key it can have: ``eh = (kh - 1) * dh + 1`` with
  excluded borders, ``2 * (kh - 1) * dh + 1`` with shifted ones (likewise ``ew``). Entry
  ``[..., a, b]`` is the weight of pixel ``(i + a - eh//2, j + b - ew//2)``: zero where
  that pixel is not a key of the query's window (or is outside the image)."""
  _, height, width, _, _ = query.shape
  probs = _window_probs(query, _gathered_windows(key, window), window, rel_h, rel_w, scale)
  probs = probs.reshape(probs.shape[:-1] + (window.kh, window.kw))
  rows, cols = window.axes(height, width)
  place_h = _placement(rows, window.kh, window.dilation[0], window.borders)
  place_w = _placement(cols, window.kw, window.dilation[1], window.borders)
  return jnp.einsum("bhwnst,hsa,wtc->bhwnac", probs, place_h, place_w)


def _placement(axis: _contract.AxisWindow, kernel: int, dilation: int, borders: str
               ) -> np.ndarray:
  """``(size, kernel, extent)`` one-hot: slot ``s`` of query ``i`` at its offset
  ``keys[i, s] - i`` from the centre of the window of every key offset the query can
  have (zero where the slot is outside the image)."""
  reach = (kernel - 1) * dilation if borders == "shift" else (kernel // 2) * dilation
  offsets = axis.keys - np.arange(len(axis.keys))[:, None]
  onehot = offsets[..., None] + reach == np.arange(2 * reach + 1)
  return (onehot & axis.inside[..., None]).astype(np.float32)


def patches(query, key, value, *, window, rel_h, rel_w, scale):
  """Windows extracted with ``conv_general_dilated_patches`` (custom pad-and-add VJP);
  excluded borders at dilation 1."""
  return _attend_windows(query, _patch_windows(key, window), _patch_windows(value, window),
                         window, rel_h, rel_w, scale)
