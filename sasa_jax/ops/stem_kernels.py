"""The Pallas TPU (Mosaic) kernel programs of the attention stem's block statistics.

``ops.stem`` calls them. The stem's input is read as ``(C~, P, L)`` blocks: channel, the
``P = b^2`` pixels of a ``b x b`` block (row-major) on the sublanes, and the blocks of the
whole batch on the 128 lanes, so that every block is one lane and every step below is
elementwise over the lanes (a 3-channel image is 42-fold padded in HBM in its NHWC form,
lane-dense in this one). A kernel instance owns ``tile`` blocks and walks the query
positions ``i`` of its blocks:

* forward: per head, the logits of query ``i`` against the ``P`` keys, the softmax over
  the sublanes, the mixture-weighted attended inputs (``(R, tile)``, ``R = N m C``
  rows), then the value projection on the MXU: the stem's output at position ``i``,
  ``(F, tile)``, rounded to the stem's dtype. Only its running maximum and minimum over
  the block (with their positions) and its per-channel sums of values and squares leave
  the kernel: the ``(B, H, W, F)`` output never reaches HBM;
* backward: the same walk, recomputing each position's probabilities and output; the
  output's cotangent is the pooled cotangents at the recorded positions plus the
  moments' (``g_sum + 2 s g_sumsq``); back through the value projection, the softmax and
  the logits to the inputs, the query-key form, the mixture weights and the value
  projection (the last three summed over every instance in VMEM-resident outputs).

Everything is float32 inside; the stem's output is rounded to its dtype as the XLA
formulation's is, so that both compute the same statistics.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

LANES = 128
_EXACT = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class StemGeometry:
  """Static shapes of one call; hashable, for ``custom_vjp``.

  ``channels``: ``C~``, the input's channels with the bias channel when there is one
  (the logits read them all, the values the first ``value_channels``); ``positions``:
  ``P``, pixels per block; ``tile``: blocks per kernel instance (a multiple of 128).
  """

  channels: int
  value_channels: int
  heads: int
  mixtures: int
  positions: int
  features: int
  tile: int
  out_dtype: str
  interpret: bool

  @property
  def attended_rows(self) -> int:
    """``R = N m C``: per head, one attended input per mixture and value channel."""
    return self.heads * self.mixtures * self.value_channels

  def form_index(self, c: int, n: int, e: int) -> int:
    """The flat index of the query-key form's entry ``[c, n, e]`` (``(C~, N, C~)``)."""
    return (c * self.heads + n) * self.channels + e


def _fold(x):
  """``(rows, tile) -> (rows, 128)``: the sum of the 128-lane slices."""
  total = x[:, :LANES]
  for start in range(LANES, x.shape[1], LANES):
    total = total + x[:, start:start + LANES]
  return total


def _prepare(x_ref, form_ref, mix_ref, q_scr, xm_scr, g: StemGeometry):
  """Per instance: ``q_scr[n C~ + e] = sum_c form[c, n, e] x[c]`` (query ``i`` maps to
  the row ``i``) and ``xm_scr[mu C + c] = p(., mu) x[c]`` (the mixture-weighted value
  inputs), ``(P, tile)`` each."""
  x = [x_ref[c].astype(jnp.float32) for c in range(g.channels)]
  for n in range(g.heads):
    for e in range(g.channels):
      q_scr[n * g.channels + e] = sum(form_ref[g.form_index(c, n, e)] * x[c]
                                      for c in range(g.channels))
  for mu in range(g.mixtures):
    weights = mix_ref[:, mu:mu + 1]
    for c in range(g.value_channels):
      xm_scr[mu * g.value_channels + c] = weights * x[c]


def _position(i, x_ref, q_scr, xm_scr, att_scr, wt_ref, g: StemGeometry, p_scr=None):
  """The stem's output at query position ``i`` of every block, ``(F, tile)`` float32 with
  the values of the output dtype; the attended inputs are left in ``att_scr`` and, with
  ``p_scr``, each head's probabilities ``(P keys, tile)`` in ``p_scr[n]``."""
  inputs = g.mixtures * g.value_channels
  for n in range(g.heads):
    logits = sum(q_scr[n * g.channels + e, pl.ds(i, 1), :] * x_ref[e].astype(jnp.float32)
                 for e in range(g.channels))
    p = jnp.exp(logits - jnp.max(logits, axis=0, keepdims=True))
    p = p / jnp.sum(p, axis=0, keepdims=True)
    if p_scr is not None:
      p_scr[n] = p
    for f in range(inputs):
      att_scr[pl.ds(n * inputs + f, 1), :] = jnp.sum(p * xm_scr[f], axis=0, keepdims=True)
  out = jnp.dot(wt_ref[...], att_scr[...], precision=_EXACT,
                preferred_element_type=jnp.float32)
  return out.astype(g.out_dtype).astype(jnp.float32)


def forward_kernel(x_ref, form_ref, mix_ref, wt_ref, max_ref, min_ref, arg_ref, sums_ref,
                   q_scr, xm_scr, att_scr, argmax_scr, argmin_scr, moments_scr, *,
                   g: StemGeometry):
  """Per block and channel the output's maximum and minimum over the block (and their
  positions, ``P argmax + argmin``); per channel the lane-folded sums of the output and
  of its squares, accumulated over every instance in ``sums_ref`` ``(2, F, 128)``."""

  @pl.when(pl.program_id(0) == 0)
  def _():
    sums_ref[...] = jnp.zeros(sums_ref.shape, sums_ref.dtype)

  _prepare(x_ref, form_ref, mix_ref, q_scr, xm_scr, g)
  shape = (g.features, g.tile)
  max_ref[...] = jnp.full(shape, -jnp.inf, max_ref.dtype)
  min_ref[...] = jnp.full(shape, jnp.inf, min_ref.dtype)
  moments_scr[...] = jnp.zeros(moments_scr.shape, moments_scr.dtype)

  def position(i, _):
    out = _position(i, x_ref, q_scr, xm_scr, att_scr, wt_ref, g)
    maximum, minimum = max_ref[...].astype(jnp.float32), min_ref[...].astype(jnp.float32)
    above, below = out > maximum, out < minimum  # Strict: the first position wins.
    max_ref[...] = jnp.where(above, out, maximum).astype(max_ref.dtype)
    min_ref[...] = jnp.where(below, out, minimum).astype(min_ref.dtype)
    argmax_scr[...] = jnp.where(above, i, argmax_scr[...])
    argmin_scr[...] = jnp.where(below, i, argmin_scr[...])
    moments_scr[0] += out
    moments_scr[1] += out * out
    return 0

  argmax_scr[...] = jnp.zeros(shape, jnp.int32)
  argmin_scr[...] = jnp.zeros(shape, jnp.int32)
  jax.lax.fori_loop(0, g.positions, position, 0)
  arg_ref[...] = argmax_scr[...] * g.positions + argmin_scr[...]
  sums_ref[0] += _fold(moments_scr[0])
  sums_ref[1] += _fold(moments_scr[1])


def backward_kernel(x_ref, form_ref, mix_ref, wt_ref, w_ref, arg_ref, gmax_ref, gmin_ref,
                    gmom_ref, dx_ref, dform_ref, dmix_ref, dw_ref, q_scr, xm_scr, att_scr,
                    p_scr, dq_scr, dxm_scr, dxk_scr, *, g: StemGeometry):
  """The cotangents of ``forward_kernel``'s inputs: ``dx`` per instance; the form's
  ``(C~ N C~, 128)``, the mixture weights' ``(m, P, 128)`` (lane-folded) and the value
  projection's ``(R, F)``, accumulated over every instance."""

  @pl.when(pl.program_id(0) == 0)
  def _():
    for ref in (dform_ref, dmix_ref, dw_ref):
      ref[...] = jnp.zeros(ref.shape, ref.dtype)

  _prepare(x_ref, form_ref, mix_ref, q_scr, xm_scr, g)
  for ref in (dxm_scr, dxk_scr):
    ref[...] = jnp.zeros(ref.shape, ref.dtype)
  inputs = g.mixtures * g.value_channels
  argmax = jax.lax.div(arg_ref[...], g.positions)  # Not //: see tpu_kernels.head_map.
  argmin = arg_ref[...] - argmax * g.positions

  def position(i, _):
    out = _position(i, x_ref, q_scr, xm_scr, att_scr, wt_ref, g, p_scr)
    d_out = (jnp.where(argmax == i, gmax_ref[...], 0.0)
             + jnp.where(argmin == i, gmin_ref[...], 0.0)
             + gmom_ref[0] + 2.0 * out * gmom_ref[1])
    d_att = jnp.dot(w_ref[...], d_out, precision=_EXACT, preferred_element_type=jnp.float32)
    dw_ref[...] += jax.lax.dot_general(att_scr[...], d_out, (((1,), (1,)), ((), ())),
                                       precision=_EXACT, preferred_element_type=jnp.float32)
    for n in range(g.heads):
      p = p_scr[n]
      rows = [d_att[n * inputs + f:n * inputs + f + 1] for f in range(inputs)]
      dp = sum(row * xm_scr[f] for f, row in enumerate(rows))
      for f, row in enumerate(rows):
        dxm_scr[f] += row * p
      d_logits = p * (dp - jnp.sum(p * dp, axis=0, keepdims=True))
      for e in range(g.channels):
        k = n * g.channels + e
        dq_scr[k, pl.ds(i, 1), :] = jnp.sum(d_logits * x_ref[e].astype(jnp.float32), axis=0,
                                            keepdims=True)
        dxk_scr[e] += d_logits * q_scr[k, pl.ds(i, 1), :]
    return 0

  jax.lax.fori_loop(0, g.positions, position, 0)
  for c in range(g.channels):
    x = x_ref[c].astype(jnp.float32)
    dx = dxk_scr[c]
    for n in range(g.heads):
      for e in range(g.channels):
        index = g.form_index(c, n, e)
        dq = dq_scr[n * g.channels + e]
        dx = dx + form_ref[index] * dq
        dform_ref[pl.ds(index, 1), :] += _fold(jnp.sum(dq * x, axis=0, keepdims=True))
    if c < g.value_channels:
      for mu in range(g.mixtures):
        dx = dx + mix_ref[:, mu:mu + 1] * dxm_scr[mu * g.value_channels + c]
    dx_ref[c] = dx.astype(dx_ref.dtype)
  for mu in range(g.mixtures):
    dmix_ref[mu] += _fold(sum(dxm_scr[mu * g.value_channels + c] * x_ref[c].astype(jnp.float32)
                              for c in range(g.value_channels)))
