"""The attention stem's op (paper §3.2): attention within ``b x b`` blocks, spatially-aware
values; and its block statistics, what the model's BatchNorm, ReLU and block max-pooling
need of its output.

Both take the stem's parameters in a contracted form (``layers.AttentionStem`` builds
them): with ``x~`` the input with a bias channel of ones where the projections have
biases (``C~`` channels; the values read the first ``C``),

* ``form`` ``(C~, N, C~)``: per head, ``W~_Q W~_K^T / sqrt(d)``, so that the logit of
  query ``i`` and key ``j`` is ``x~_i^T form[:, n, :] x~_j``;
* ``mixture`` ``(P, m)``: ``p(j, mu)``, the weight of value projection ``mu`` at block
  position ``j`` (``P = b^2``, row-major);
* ``values`` ``(N m C, F)``: head ``n``'s value projections ``W_V^mu`` (rows ``(mu, c)``)
  on the block diagonal of its output channels.

``block_attention`` is the XLA formulation (every platform; it also returns the
probabilities, for attention maps). ``block_statistics`` computes the output's
``BlockStatistics``; where the program is lowered for TPU it runs Pallas Mosaic kernels
(``stem_kernels``) that never write the ``(B, H, W, F)`` output to HBM, elsewhere it
reduces ``block_attention``'s output.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sasa_jax.ops import platforms, tpu
from sasa_jax.ops.stem_kernels import LANES, StemGeometry, backward_kernel, forward_kernel

_TILE = 512  # Blocks per kernel instance: 16 positions x 512 lanes, 32 KiB a plane.


class BlockStatistics(NamedTuple):
  """What BatchNorm (batch statistics), ReLU and max-pooling over the blocks need of an
  output ``y`` ``(B, H, W, F)``: ``maximum``, ``minimum`` ``(B, H/b, W/b, F)`` of each
  block, in ``y``'s dtype; ``mean``, ``mean_square`` ``(F,)`` float32 over the batch and
  every pixel."""

  maximum: jax.Array
  minimum: jax.Array
  mean: jax.Array
  mean_square: jax.Array


def block_attention(x: jax.Array, form: jax.Array, mixture: jax.Array, values: jax.Array, *,
                    block: int) -> tuple[jax.Array, jax.Array]:
  """The stem's output ``(B, H, W, F)`` for ``x`` ``(B, H, W, C~)`` (see the module
  docstring), in ``x``'s dtype, and its probabilities ``(B, H/b, W/b, N P, P)`` float32
  (row ``(n, i)``: head ``n``'s query ``i`` over the block's keys ``j``).

  Computed in ``C~``-wide contractions, never forming ``F``-wide queries or keys: per
  head, ``q_i . k_j = x~_i^T form x~_j``; and ``sum_j softmax_j(.) v_j =
  sum_mu W_V^mu (sum_j softmax_j(.) p(j, mu) x_j)``, so the value projections are one
  matmul of the attended inputs.
  """
  batch, height, width, _ = x.shape
  heads = form.shape[1]
  mixtures = mixture.shape[1]
  value_channels = values.shape[0] // (heads * mixtures)
  blocks = dict(p=block, q=block)
  augmented = einops.rearrange(x, "b (x p) (y q) c -> b x y (p q) c", **blocks)
  mapped = jnp.einsum("bxyic,cne->bxynie", augmented, form.astype(x.dtype))
  mapped = mapped.reshape(mapped.shape[:3] + (-1, mapped.shape[-1]))
  logits = jnp.einsum("bxyke,bxyje->bxykj", mapped, augmented,
                      preferred_element_type=jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  # (B, X, Y, P, m C): key j's input weighted by each mixture p(j, mu).
  mixed = jnp.einsum("jm,bxyjc->bxyjmc", mixture.astype(x.dtype),
                     augmented[..., :value_channels])
  mixed = mixed.reshape(mixed.shape[:4] + (-1,))
  attended = jnp.einsum("bxykj,bxyjf->bxykf", probs.astype(x.dtype), mixed)
  attended = einops.rearrange(attended, "b x y (n p q) f -> (b x p y q) (n f)", n=heads,
                              **blocks)
  out = attended @ values.astype(x.dtype)
  return out.reshape(batch, height, width, -1), probs


def statistics_of(y: jax.Array, block: int) -> BlockStatistics:
  """``BlockStatistics`` of ``y`` ``(B, H, W, F)`` over ``block x block`` blocks. An
  extreme's gradient goes to its first pixel (row-major) where several tie, as
  max-pooling's goes to one pixel and as the kernels do."""
  blocks = einops.rearrange(y, "b (x p) (y q) f -> b x y (p q) f", p=block, q=block)
  first = lambda index: jnp.take_along_axis(blocks, index, axis=3)[:, :, :, 0]
  y32 = y.astype(jnp.float32)
  return BlockStatistics(first(blocks.argmax(axis=3, keepdims=True)),
                         first(blocks.argmin(axis=3, keepdims=True)),
                         y32.mean(axis=(0, 1, 2)), jnp.square(y32).mean(axis=(0, 1, 2)))


def block_statistics(x: jax.Array, form: jax.Array, mixture: jax.Array, values: jax.Array,
                     *, block: int, interpret: bool | None = None) -> BlockStatistics:
  """``statistics_of(block_attention(...)[0], block)``, arguments as ``block_attention``.

  ``interpret=None``: chosen for the platform the program is for
  (``platforms.platform_dependent``), the Mosaic kernels for TPU (also when compiling for
  TPU from another host) and the XLA formulation elsewhere;
  ``interpret=True``: the kernels in Pallas's TPU interpret mode, on any platform (exact
  and slow: for tests).
  """
  def xla(*arrays):
    return statistics_of(block_attention(*arrays, block=block)[0], block)

  kernels = functools.partial(_per_device, block=block)
  if interpret:
    return kernels(x, form, mixture, values, interpret=True)
  return platforms.platform_dependent(
      x, form, mixture, values, tpu=functools.partial(kernels, interpret=False), default=xla)


def _per_device(x, form, mixture, values, *, block, interpret):
  """``_run`` on each device's share of the batch (``tpu.on_each_device``); each device's
  sums, stacked, are added outside, where XLA reduces over the devices."""
  run = functools.partial(_run, block=block, interpret=interpret)
  stacked = lambda *arrays: (lambda mx, mn, sums: (mx, mn, sums[None]))(*run(*arrays))
  maximum, minimum, sums = tpu.on_each_device(stacked, (x,), (form, mixture, values))
  sums = sums.sum(axis=0)
  count = x.shape[0] * x.shape[1] * x.shape[2]
  return BlockStatistics(maximum, minimum, sums[0] / count, sums[1] / count)


def _run(x, form, mixture, values, *, block, interpret):
  """The kernels on ``x`` as ``(C~, P, L)`` blocks (lanes padded with zero blocks, whose
  output is zero: no bias reaches the values); returns the block maxima and minima
  ``(B, X, Y, F)`` and the sums of the output and its squares ``(2, F)``."""
  batch, height, width, channels = x.shape
  heads, mixtures = form.shape[1], mixture.shape[1]
  blocks = einops.rearrange(x, "b (x p) (y q) c -> c (p q) (b x y)", p=block, q=block)
  count = blocks.shape[-1]
  tile = min(_TILE, -(-count // LANES) * LANES)
  blocks = jnp.pad(blocks, ((0, 0), (0, 0), (0, -count % tile)))
  g = StemGeometry(channels, values.shape[0] // (heads * mixtures), heads, mixtures,
                   block * block, values.shape[1], tile, jnp.dtype(x.dtype).name, interpret)
  maximum, minimum, sums = _statistics(blocks, form.astype(jnp.float32).reshape(-1),
                                       mixture.astype(jnp.float32),
                                       values.astype(jnp.float32), g)
  pooled = dict(b=batch, x=height // block, y=width // block)
  maximum, minimum = (einops.rearrange(m[:, :count], "f (b x y) -> b x y f", **pooled)
                      for m in (maximum, minimum))
  return maximum, minimum, sums.sum(axis=-1)


def _walk_scratch(g: StemGeometry) -> list:
  """What both kernels' walk over the query positions keeps in VMEM: the per-head query
  maps, the mixture-weighted inputs and one position's attended inputs."""
  return [pltpu.VMEM((g.heads * g.channels, g.positions, g.tile), jnp.float32),
          pltpu.VMEM((g.mixtures * g.value_channels, g.positions, g.tile), jnp.float32),
          pltpu.VMEM((g.attended_rows, g.tile), jnp.float32)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _statistics(blocks, form, mixture, values, g: StemGeometry):
  """``(F, L)`` block maxima and minima, ``(2, F, 128)`` lane-folded sums."""
  return _statistics_fwd(blocks, form, mixture, values, g)[0]


def _statistics_fwd(blocks, form, mixture, values, g):
  lanes = blocks.shape[-1]
  pooled = jax.ShapeDtypeStruct((g.features, lanes), blocks.dtype)
  scratch = [*_walk_scratch(g), pltpu.VMEM((g.features, g.tile), jnp.int32),
             pltpu.VMEM((g.features, g.tile), jnp.int32),
             pltpu.VMEM((2, g.features, g.tile), jnp.float32)]
  maximum, minimum, arg, sums = _call(
      forward_kernel, g, blocks, (form, mixture, values.T), (),
      (pooled, pooled, jax.ShapeDtypeStruct((g.features, lanes), jnp.int32)),
      (jax.ShapeDtypeStruct((2, g.features, LANES), jnp.float32),), scratch)
  return (maximum, minimum, sums), (blocks, form, mixture, values, arg)


def _statistics_bwd(g: StemGeometry, residuals, cotangents):
  blocks, form, mixture, values, arg = residuals
  gmax, gmin, gsums = cotangents
  tiled = jnp.tile(gsums, (1, 1, g.tile // LANES))  # Every lane's cotangent, per tile.
  scratch = [*_walk_scratch(g), pltpu.VMEM((g.heads, g.positions, g.tile), jnp.float32),
             pltpu.VMEM((g.heads * g.channels, g.positions, g.tile), jnp.float32),
             pltpu.VMEM((g.mixtures * g.value_channels, g.positions, g.tile), jnp.float32),
             pltpu.VMEM((g.channels, g.positions, g.tile), jnp.float32)]
  dblocks, dform, dmix, dvalues = _call(
      backward_kernel, g, blocks, (form, mixture, values.T, values),
      (arg, gmax.astype(jnp.float32), gmin.astype(jnp.float32)),
      (jax.ShapeDtypeStruct(blocks.shape, blocks.dtype),),
      (jax.ShapeDtypeStruct((form.shape[0], LANES), jnp.float32),
       jax.ShapeDtypeStruct((g.mixtures, g.positions, LANES), jnp.float32),
       jax.ShapeDtypeStruct(values.shape, jnp.float32)), scratch, extra=(tiled,), passes=3)
  return dblocks, dform.sum(axis=-1), dmix.sum(axis=-1).T, dvalues


_statistics.defvjp(_statistics_fwd, _statistics_bwd)


def _flops(g: StemGeometry, lanes: int) -> int:
  """The forward kernel's: per block and query position, each head's logits, softmax
  and attended inputs, then the value projection and the statistics."""
  per_head = g.positions * (2 * g.channels + 4 + 2 * g.mixtures * g.value_channels)
  return lanes * g.positions * (g.heads * per_head + 2 * g.attended_rows * g.features
                                + 4 * g.features)


def _call(kernel, g: StemGeometry, blocks, params, lane_inputs, lane_outputs, sums,
          scratch, extra=(), passes=1):
  """The pallas_call of ``kernel`` over the tiles of ``blocks`` ``(C~, P, L)``:
  ``params`` (the flat form in SMEM, then whole arrays in VMEM), ``lane_inputs`` and
  ``lane_outputs`` ``(rows, L)`` or ``blocks``-shaped (a tile at a time), ``extra``
  whole arrays; ``sums``: outputs accumulated over the tiles (resident in VMEM). Its
  cost estimate: ``passes`` times the forward kernel's flops, every operand's and
  result's bytes in HBM's layout (as the layer's kernels declare theirs)."""
  def tiled(shape):
    if len(shape) == 3:
      return pl.BlockSpec((shape[0], shape[1], g.tile), lambda t: (0, 0, t))
    return pl.BlockSpec((shape[0], g.tile), lambda t: (0, t))

  def whole(shape):
    return pl.BlockSpec(shape, lambda t, n=len(shape): (0,) * n)

  form, *arrays = params
  in_specs = ([tiled(blocks.shape), pl.BlockSpec(memory_space=pltpu.SMEM)]
              + [whole(a.shape) for a in arrays] + [tiled(a.shape) for a in lane_inputs]
              + [whole(a.shape) for a in extra])
  out_specs = [tiled(s.shape) for s in lane_outputs] + [whole(s.shape) for s in sums]
  operands = (blocks, form, *arrays, *lane_inputs, *extra)
  flops = passes * _flops(g, blocks.shape[-1])
  # One core walks the tiles in order: the sums are accumulated in place.
  return pl.pallas_call(
      functools.partial(kernel, g=g), grid=(blocks.shape[-1] // g.tile,),
      in_specs=in_specs, out_specs=out_specs, out_shape=[*lane_outputs, *sums],
      scratch_shapes=scratch,
      compiler_params=pltpu.CompilerParams(dimension_semantics=("arbitrary",)),
      interpret=pltpu.InterpretParams() if g.interpret else False,
      cost_estimate=pl.CostEstimate(flops=flops, bytes_accessed=tpu.hbm_bytes(
                                        (*operands, *lane_outputs, *sums)),
                                    transcendentals=passes * blocks.shape[-1] * g.heads
                                    * g.positions**2),
  )(*operands)
