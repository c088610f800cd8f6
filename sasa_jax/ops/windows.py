"""Window-gathering implementations: every query's ``kh x kw`` memory block is materialised.

``reference`` gathers the windows by stacking ``kh * kw`` shifted slices: the plainest
correct version, the ground truth of the tests. ``patches`` extracts them with
``jax.lax.conv_general_dilated_patches`` (one fused op), whose plain gradient is a
transposed one-hot convolution and very slow on CPU, so it carries a ``custom_vjp`` that
folds the window gradients back with pad-and-add.

Both hold a ``kh * kw``-fold copy of K and V: they are for checking and small windows, not
the default path (see ``blocked``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sasa_jax.ops import _contract


def _window_probs(query, key_windows, window, rel_h, rel_w, scale):
  """Attention probabilities of each query over its materialised window.

  Args:
    query: ``(B, H, W, N, d)``.
    key_windows: ``(B, H, W, N, d, kh * kw)``: neighbour ``a * kw + b`` of pixel ``(i, j)``
      is pixel ``(i + a - rh, j + b - rw)``, zero outside the image.
    window: the ``Window``; rel_h, rel_w, scale: as in ``local_attention``.

  Returns:
    ``(B, H, W, N, kh * kw)`` float32, zero for neighbours outside the image.
  """
  _, height, width, _, _ = query.shape
  logits = jnp.einsum("bhwnd,bhwndk->bhwnk", query, key_windows,
                      preferred_element_type=jnp.float32)
  if rel_h is not None:
    logit_h, logit_w = _contract.relative_logits(query, rel_h, rel_w)
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


def _stacked_windows(x, window: _contract.Window):
  """``(B, H, W, N, d)`` -> ``(B, H, W, N, d, kh * kw)`` by stacking shifted slices."""
  _, height, width, _, _ = x.shape
  padded = jnp.pad(x, ((0, 0), (window.rh, window.rh), (window.rw, window.rw), (0, 0), (0, 0)))
  shifted = [
      padded[:, a:a + height, b:b + width] for a in range(window.kh) for b in range(window.kw)
  ]
  return jnp.stack(shifted, axis=-1)


def reference(query, key, value, *, window, rel_h, rel_w, scale):
  """The plainest correct implementation: windows by stacked shifts, masked softmax."""
  return _attend_windows(query, _stacked_windows(key, window), _stacked_windows(value, window),
                         window, rel_h, rel_w, scale)


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
  """``(B, H, W, N, kh, kw)`` float32 attention probabilities, for inspection."""
  probs = _window_probs(query, _stacked_windows(key, window), window, rel_h, rel_w, scale)
  return probs.reshape(probs.shape[:-1] + (window.kh, window.kw))


def patches(query, key, value, *, window, rel_h, rel_w, scale):
  """Windows extracted with ``conv_general_dilated_patches`` (custom pad-and-add VJP)."""
  return _attend_windows(query, _patch_windows(key, window), _patch_windows(value, window),
                         window, rel_h, rel_w, scale)
