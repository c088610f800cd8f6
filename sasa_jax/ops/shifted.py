"""Shifted-slice local attention: every window offset is one slice of the padded keys.

The op works on planes, ``(N, d, B, H, W)`` in float32 with the image axes minor. Window
offset ``o = (a, b)`` of every query at once is then the slice ``[a:a + H, b:b + W]`` of K
(or V) zero-padded by the window's radii, and

* the logits of offset ``o`` are ``sum_c q_c * k_c(shifted by o)``: ``d`` products and
  adds that XLA fuses into one loop over the image, vectorised along its rows;
* the output is ``sum_o p_o * v(shifted by o)``, one more such loop.

Nothing ``k^2 * d``-sized is formed (no window copy of K or V), and no logit is wasted
(``blocked`` computes ``(b + k - 1)^2`` logits per query, twice the window at b = 4,
k = 7). The only ``kh * kw``-sized tensors are the logits and probabilities, one per
query, head and window slot, as in every implementation that keeps them for the backward
pass.

Relative logits fold into the keys: with ``r[a * kw + b] = concat(rel_h[a], rel_w[b])``,
the logit of offset ``(a, b)`` is ``q . (k(i + a - rh, j + b - rw) + r[a * kw + b])``, i.e.
``q . k + q[:d/2] . rel_h[a] + q[d/2:] . rel_w[b]``, the reference's logit.

The backward pass (a ``custom_vjp``) has the same form and scatters nothing: ``dq`` sums
the shifted ``k + r`` weighted by the logit gradients; ``dk`` and ``dv`` gather, at every
key, the logit gradients (resp. probabilities) of the queries that see it, through the
mirrored shift of planes padded the same way; ``d r`` is one contraction of the logit
gradients with q.

The channel sums are unrolled, so the compiled program grows like ``kh * kw * d``:
compiling one layer takes seconds at d = 32-64 (benchmarks/README.md). Meant for the
paper's windows, not for global ones (``dense``).

Measured on the 2-core CPU (benchmarks/README.md): 1.1-2x faster than ``blocked`` fwd+bwd
at the models' shapes from 16x16 up (d = 8-32), 4.4x a 3x3 conv for the whole layer at
the issue's target shape (``blocked``: 8.7-10x). Not yet measured on GPU or TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sasa_jax.ops import _contract


def _offsets(window: _contract.Window) -> list[tuple[int, int]]:
  """Window slot ``o`` -> its offset ``(a, b)`` in the padded plane, row-major."""
  return [(a, b) for a in range(window.kh) for b in range(window.kw)]


def _pad(x, window: _contract.Window):
  """Zero-pads the two image axes (the last two) by the window's radii."""
  return jnp.pad(x, [(0, 0)] * (x.ndim - 2) + [(window.rh, window.rh), (window.rw, window.rw)])


def _unpadded_shape(xp, window: _contract.Window) -> tuple[int, int]:
  return xp.shape[-2] - 2 * window.rh, xp.shape[-1] - 2 * window.rw


def _unpad(xp, window: _contract.Window):
  """The image part of a ``_pad``-ded array."""
  height, width = _unpadded_shape(xp, window)
  return xp[..., window.rh:window.rh + height, window.rw:window.rw + width]


def _sum(terms):
  return functools.reduce(jnp.add, terms)


def _in_memory(x):
  """``x``, computed once into memory rather than inside each of its consumers.

  XLA fuses a cheap producer (a transpose, a pad, the sums below) into every consumer and
  recomputes it there, in the consumer's layout: the per-slot loops reading a transposed
  q, the output sum writing a transposed output, or dq, dk, dv recomputed for each of the
  projection's two backward matmuls (the layer ran 2-2.5x slower on CPU). It keeps a value
  in memory when a reduction of the whole value is computed too, so ``x`` gets one that
  adds an exact zero: ``fmin(0, max |x|)`` is 0 whatever ``x`` holds, NaN and inf
  included. (``lax.optimization_barrier`` does not help: the CPU compiler removes it
  before fusion; nor does a reduction of a slice of ``x``, or an ``any``.)
  """
  return x + jnp.fmin(0., jnp.max(jnp.abs(x)))


def _offset_table(rel_h, rel_w, window: _contract.Window):
  """``(kh * kw, d)``: row ``a * kw + b`` is ``concat(rel_h[a], rel_w[b])``."""
  return jnp.concatenate([jnp.repeat(rel_h, window.kw, axis=0),
                          jnp.tile(rel_w, (window.kh, 1))], axis=1)


def _mask_bias(height: int, width: int, window: _contract.Window) -> np.ndarray:
  """``(kh * kw, H, W)``: the logit bias of slot ``o`` of pixel ``(i, j)``: 0 in the image,
  ``MASKED_LOGIT`` outside."""
  return np.moveaxis(_contract.mask_bias(_contract.window_mask(height, width, window)), -1, 0)


def _shifted_dots(xp, yp, table, window: _contract.Window, bias=None):
  """``(N, kh * kw, B, H, W)``: slot ``o = (a, b)`` holds
  ``sum_c x[c, i, j] * (y[c, i + a - rh, j + b - rw] + table[o, c]) + bias[o, i, j]``.

  Args:
    xp, yp: ``(N, d, B, H + kh - 1, W + kw - 1)``, x and y padded.
    table: ``(kh * kw, d)`` or None (no added term).
    bias: ``(kh * kw, H, W)`` or None.
  """
  height, width = _unpadded_shape(xp, window)
  x = _unpad(xp, window)
  slots = []
  for o, (a, b) in enumerate(_offsets(window)):
    terms = []
    for c in range(xp.shape[1]):
      y = yp[:, c, :, a:a + height, b:b + width]
      terms.append(x[:, c] * (y if table is None else y + table[o, c]))
    if bias is not None:
      terms.append(bias[o])
    slots.append(_sum(terms))
  return jnp.stack(slots, axis=1)


def _weighted_shifts(sp, yp, table, window: _contract.Window):
  """``(N, d, B, H, W)``: ``sum_o s[o, i, j] * (yp[:, i + a, j + b] + table[o])``.

  Args:
    sp: ``(N, kh * kw, B, H + kh - 1, W + kw - 1)`` per-slot weights, padded.
    yp: ``(N, d, B, H + kh - 1, W + kw - 1)``, padded; table: ``(kh * kw, d)`` or None.
  """
  height, width = _unpadded_shape(sp, window)
  s = _unpad(sp, window)
  terms = []
  for o, (a, b) in enumerate(_offsets(window)):
    y = yp[..., a:a + height, b:b + width]
    if table is not None:
      y = y + table[o][:, None, None, None]
    terms.append(s[:, o, None] * y)
  return _sum(terms)


def _mirrored_shifts(sp, xp, window: _contract.Window):
  """``(N, d, B, H, W)``: at key ``(u, v)``, ``sum_o s[o, u - a', v - b'] * x[:, u - a', v - b']``
  over the queries ``(u - a', v - b')`` whose slot ``o`` is that key (``a' = a - rh``).

  The transpose of ``_shifted_dots``/``_weighted_shifts`` as a gather: ``sp`` (``(N,
  kh * kw, B, ...)``) and ``xp`` (``(N, d, B, ...)``) are padded, so queries outside the
  image contribute zeros.
  """
  height, width = _unpadded_shape(xp, window)
  terms = []
  for o, (a, b) in enumerate(_offsets(window)):
    ma, mb = window.kh - 1 - a, window.kw - 1 - b
    terms.append(sp[:, o, None, :, ma:ma + height, mb:mb + width] *
                 xp[..., ma:ma + height, mb:mb + width])
  return _sum(terms)


def _forward(q, k, v, table, window, scale):
  """Output planes and the residuals of the backward pass (q, k, v padded)."""
  height, width = q.shape[-2:]
  qp, kp, vp = (_in_memory(_pad(x, window)) for x in (q, k, v))
  # The mask goes into the per-slot loops: added to the stacked logits, it would be
  # broadcast to their full size in memory.
  logits = _shifted_dots(scale * qp, kp, table, window, _mask_bias(height, width, window))
  probs_padded = _pad(jax.nn.softmax(logits, axis=1), window)
  out = _in_memory(_weighted_shifts(probs_padded, vp, None, window))
  return out, (qp, kp, vp, table, out, probs_padded)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend_planes(q, k, v, table, window, scale):
  """Local attention on ``(N, d, B, H, W)`` float32 planes; ``table`` as ``_offset_table``."""
  return _forward(q, k, v, table, window, scale)[0]


def _attend_planes_fwd(q, k, v, table, window, scale):
  return _forward(q, k, v, table, window, scale)


def _attend_planes_bwd(window, scale, residuals, grad):
  qp, kp, vp, table, out, probs_padded = residuals
  grad_padded = _in_memory(_pad(grad, window))
  grad_probs = _shifted_dots(grad_padded, vp, None, window)
  delta = jnp.sum(grad * out, axis=1, keepdims=True)  # = sum_o probs * grad_probs
  # d/d(q . (k + r)), the logit before the scale.
  grad_logits = scale * _unpad(probs_padded, window) * (grad_probs - delta)
  grad_logits_padded = _pad(grad_logits, window)
  dq = _weighted_shifts(grad_logits_padded, kp, table, window)
  dk = _mirrored_shifts(grad_logits_padded, qp, window)
  dv = _mirrored_shifts(probs_padded, grad_padded, window)
  dq, dk, dv = map(_in_memory, (dq, dk, dv))
  dtable = None if table is None else jnp.einsum("nobij,ncbij->oc", grad_logits,
                                                 _unpad(qp, window))
  return dq, dk, dv, dtable


_attend_planes.defvjp(_attend_planes_fwd, _attend_planes_bwd)


def shifted(query, key, value, *, window, rel_h, rel_w, scale):
  """Shifted-slice local attention; same contract as ``reference``."""

  def planes(x):  # (B, H, W, N, d) -> (N, d, B, H, W)
    return x.transpose(3, 4, 0, 1, 2).astype(jnp.float32)

  table = None
  if rel_h is not None:
    table = _offset_table(rel_h.astype(jnp.float32), rel_w.astype(jnp.float32), window)
  out = _attend_planes(planes(query), planes(key), planes(value), table, window, scale)
  return out.transpose(2, 3, 4, 0, 1).astype(query.dtype)
