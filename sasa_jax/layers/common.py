"""What the SASA layers share: input and configuration checks, and the heads' projections.

A head projection is a full-width 1x1 projection ``(B, H, W, C) -> (B, H, W, N, d)``
(kernel ``(C, N, d)``), the paper's query, key and value maps (§3).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def check_input(name: str, x) -> None:
  if getattr(x, "ndim", None) != 4:
    raise ValueError(
        f"{name} expects images of rank 4, shape (B, H, W, C) (NHWC); got shape "
        f"{getattr(x, 'shape', None)}.")


def check_positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int; got {value!r}.")


def check_heads(features, num_heads) -> None:
  """Both positive ints, ``num_heads`` dividing ``features``."""
  check_positive_int("features", features)
  check_positive_int("num_heads", num_heads)
  if features % num_heads:
    raise ValueError(
        f"features must be divisible by num_heads; got features={features}, "
        f"num_heads={num_heads} (allowed num_heads: divisors of {features}).")


class HeadProjection(nn.Module):
  """A full-width 1x1 projection ``(B, H, W, C) -> (B, H, W, N, d)``: ``DenseGeneral``'s
  parameters (``kernel`` ``(C, N, d)``, ``bias`` ``(N, d)``) and initialisation, computed
  as one ``(C, N·d)`` matmul whose ``N·d`` channels are then split into heads.

  The split is a reshape of the result, which the op undoes where it works on all heads
  at once (``ops.tpu``): on TPU an array whose two minor dimensions are ``(N, d)`` pads
  ``d`` to the 128 lanes (16 times the bytes at ``d = 8``), so it is never formed there.
  """

  num_heads: int
  head_depth: int
  use_bias: bool
  dtype: Dtype | None
  param_dtype: Dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    channels, features = x.shape[-1], self.num_heads * self.head_depth

    def flat_init(init):  # DenseGeneral's: drawn as (C, N·d), stored as (C, N, d).
      return lambda key, shape, dtype: init(key, (shape[0], features), dtype).reshape(shape)

    kernel = self.param("kernel", flat_init(nn.initializers.lecun_normal()),
                        (channels, self.num_heads, self.head_depth), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, kernel)
    y = jnp.dot(x.astype(dtype), kernel.reshape(channels, features).astype(dtype))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros_init(),
                        (self.num_heads, self.head_depth), self.param_dtype)
      y = y + bias.reshape(features).astype(dtype)
    return y.reshape(*x.shape[:-1], self.num_heads, self.head_depth)


def head_projection(num_heads: int, head_depth: int, use_bias: bool, dtype: Dtype,
                    param_dtype: Dtype, name: str) -> HeadProjection:
  """A full-width 1x1 projection ``(B, H, W, C) -> (B, H, W, N, d)``."""
  return HeadProjection(num_heads, head_depth, use_bias, dtype, param_dtype, name=name)


class HeadProjectionWeights(nn.Module):
  """The parameters of ``head_projection`` (``kernel`` ``(C, N, d)``, ``bias`` ``(N, d)``,
  initialised the same way), for a module that contracts them itself."""

  num_heads: int
  head_depth: int
  use_bias: bool
  param_dtype: Dtype

  @nn.compact
  def __call__(self, channels: int) -> jax.Array:
    """``(C, N, d)``, or with ``use_bias`` ``(C + 1, N, d)``: the bias is the last row."""
    shape = (self.num_heads, self.head_depth)
    kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=(1, 2)),
                        (channels,) + shape, self.param_dtype)
    if not self.use_bias:
      return kernel
    bias = self.param("bias", nn.initializers.zeros_init(), shape, self.param_dtype)
    return jnp.concatenate([kernel, bias[None]], axis=0)
