"""BatchNorm, ReLU and max-pooling over blocks, from the blocks' statistics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from sasa_jax.ops.stem import BlockStatistics


class PooledBatchNorm(nn.BatchNorm):
  """``max_pool(relu(nn.BatchNorm(...)(y)), b, b)`` from ``y``'s ``BlockStatistics``.

  ``nn.BatchNorm``'s fields and variables (params ``scale``, ``bias``; ``batch_stats``
  ``mean``, ``var``, updated alike), with the models' settings: features last, scale and
  bias, ``use_fast_variance``, no ``axis_name`` (under ``jit``, XLA reduces the batch
  statistics over the devices); other settings are refused.

  The same function: BatchNorm is, per channel, the monotone map
  ``t -> (t - mean) * mul + bias`` (``mul = scale / sqrt(var + epsilon)``), and so is its
  rounding to ``dtype`` and ReLU; the maximum of a non-decreasing map over a block is the
  map of the block's maximum, of a non-increasing one (``mul < 0``) the map of its
  minimum. Applied to that one value per block, exactly as ``nn.BatchNorm`` applies it
  to each pixel, it gives the same numbers; the gradient reaches the block's maximum
  (minimum) pixel, and every pixel through the batch statistics.
  """

  def __post_init__(self):
    supported = dict(axis=-1, use_scale=True, use_bias=True, use_fast_variance=True,
                     axis_name=None)
    unsupported = {k: getattr(self, k) for k, v in supported.items() if getattr(self, k) != v}
    if unsupported:
      raise ValueError(f"PooledBatchNorm computes BatchNorm with {supported} (the models'); "
                       f"got {unsupported}.")
    super().__post_init__()

  @nn.compact
  def __call__(self, stats: BlockStatistics,  # pytype: disable=signature-mismatch
               use_running_average: bool | None = None) -> jax.Array:
    """``stats`` of ``y`` ``(B, H, W, F)`` -> ``(B, H / b, W / b, F)``."""
    use_running_average = nn.merge_param("use_running_average", self.use_running_average,
                                         use_running_average)
    features = (stats.maximum.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                            features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                           features)
    if use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean = stats.mean
      var = jnp.maximum(0.0, stats.mean_square - jnp.square(mean))
      if not self.is_initializing():
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    mul = jax.lax.rsqrt(var + self.epsilon) * scale
    extreme = jnp.where(mul >= 0, stats.maximum, stats.minimum)
    y = (extreme - mean) * mul + bias
    return nn.relu(jnp.asarray(y, self.dtype or jnp.result_type(extreme, scale, bias)))
