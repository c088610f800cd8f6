"""Bottleneck ResNets whose spatial layers are convolutions or SASA (paper §3, §4.1).

One module, ``ResNet``, covers every model of the paper's Table 1: the convolutional
baseline, "conv-stem + attention" (every bottleneck 3x3 conv replaced by
``LocalSelfAttention``) and "full attention" (the stem too, ``AttentionStem``), plus
small-input variants for CIFAR- and Fashion-MNIST-sized images. Named configurations live in
``sasa_jax.models.registry``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sasa_jax.layers import AttentionStem, LocalSelfAttention, PooledBatchNorm

Dtype = Any
ModuleDef = Any

SPATIAL_LAYERS = ("conv", "attention")
STEMS = ("conv", "attention")
EXPANSION = 4

# He initialisation (fan-out), the usual choice for ResNet convolutions.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BottleneckBlock(nn.Module):
  """The bottleneck residual block with a convolutional or self-attention spatial layer.

  ``(B, H, W, C) -> (B, H / stride, W / stride, 4 * width)``: 1x1 conv to ``width``, the
  spatial layer (carrying the stride, as in ResNet v1.5), 1x1 conv to ``4 * width``, each
  followed by BatchNorm (the last one zero-initialised, so the block starts as identity)
  and ReLU after the residual sum. Where the shape changes, the shortcut is a strided 1x1
  conv and BatchNorm.

  The spatial layer is a 3x3 conv (``spatial='conv'``) or ``LocalSelfAttention``
  (``spatial='attention'``, paper §3: at stride 2 it attends at the input resolution,
  then 2x2 average-pools).

  Attributes:
    width: the bottleneck width; the block outputs ``4 * width`` channels.
    stride: 1, or 2 to halve H and W.
    spatial: one of ``SPATIAL_LAYERS``.
    conv: ``nn.Conv`` with the model's defaults bound.
    norm: ``nn.BatchNorm`` with the model's defaults bound.
    attention: ``LocalSelfAttention`` with the model's defaults bound.
  """

  width: int
  stride: int
  spatial: str
  conv: ModuleDef
  norm: ModuleDef
  attention: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(self.norm(name="bn1")(self.conv(self.width, (1, 1), name="conv1")(x)))
    if self.spatial == "conv":
      y = self.conv(self.width, (3, 3), strides=self.stride, name="conv2")(y)
    else:
      y = self.attention(self.width, stride=self.stride, name="attention")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(EXPANSION * self.width, (1, 1), name="conv3")(y)
    y = self.norm(scale_init=nn.initializers.zeros, name="bn3")(y)
    if x.shape != y.shape:
      x = self.conv(EXPANSION * self.width, (1, 1), strides=self.stride, name="proj_conv")(x)
      x = self.norm(name="proj_bn")(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A bottleneck ResNet; ``spatial`` and ``stem`` pick the paper's variants (§4.1).

  ``__call__(x, train)``: NHWC float images ``(B, H, W, C)`` -> float32 logits
  ``(B, num_classes)``. Stage ``s`` (from 0) has ``stage_sizes[s]`` blocks of width
  ``width * 2**s`` (``4 * width * 2**s`` output channels); every stage but the first
  starts with a stride-2 block.

  Stems (the stem's width is ``width``):
    * ``stem='conv'``: 7x7 stride-2 conv, BatchNorm, ReLU, 3x3 stride-2 max-pooling
      (``H / 4``); with ``small_inputs``, a 3x3 stride-1 conv, BatchNorm, ReLU (``H``).
    * ``stem='attention'`` (paper §3.2): ``AttentionStem`` over
      ``stem_block_size``-square blocks, BatchNorm, ReLU, then max-pooling over the same
      blocks (``H / stem_block_size``); with ``small_inputs``, no pooling (``H``).
    * with ``small_inputs`` and ``stem_pool > 1``, either stem ends with
      ``stem_pool x stem_pool`` max-pooling, stride ``stem_pool`` (``H / stem_pool``):
      the Fashion-MNIST models (28 -> 14). With the attention stem and ``stem_pool ==
      stem_block_size`` each pooling window is one attention block, as in the paper.
    * where the pooling windows are the attention's blocks, BatchNorm, ReLU and pooling
      are ``PooledBatchNorm`` on the stem's block statistics: the same function (and
      variables), without the stem's full-resolution output (on TPU, never in memory).

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(3, 4, 6, 3)`` for ResNet-50.
    num_classes: classifier outputs.
    width: the first stage's bottleneck width and the stem's width (paper: 64).
    spatial: each bottleneck's spatial layer, one of ``SPATIAL_LAYERS``; or one per stage,
      e.g. ``('conv', 'attention', 'attention', 'attention')``, the paper's "conv early,
      attention late" ablation.
    stem: one of ``STEMS``.
    small_inputs: for CIFAR-sized images: a stem without downsampling (but see
      ``stem_pool``).
    stem_pool: with ``small_inputs``, the max-pooling window and stride that end the
      stem; 1: none.
    kernel_size, num_heads, positional, content, borders, implementation:
      ``LocalSelfAttention``'s (paper: k = 7, 8 heads, relative positions, content term
      on, excluded borders).
    dilation: ``LocalSelfAttention``'s, an int for every stage or one int per stage, e.g.
      ``(2, 1)`` (dilated windows in the first of two stages).
    stem_heads, stem_block_size, stem_mixtures: ``AttentionStem``'s ``num_heads``,
      ``block_size`` and ``num_mixtures`` (``stem_mixtures=1`` is a plain attention stem).
    dtype: computation dtype (``None``: inferred); the logits are float32 regardless.
    param_dtype: parameter dtype.
  """

  stage_sizes: Sequence[int]
  num_classes: int = 1000
  width: int = 64
  spatial: str | Sequence[str] = "conv"
  stem: str = "conv"
  small_inputs: bool = False
  stem_pool: int = 1
  kernel_size: int | tuple[int, int] | None = 7
  dilation: int | Sequence[int] = 1
  borders: str = "exclude"
  num_heads: int = 8
  positional: str = "relative"
  content: bool = True
  implementation: str | None = None
  stem_heads: int = 4
  stem_block_size: int = 4
  stem_mixtures: int = 4
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    if (not isinstance(self.stage_sizes, Sequence) or not self.stage_sizes or
        any(not isinstance(n, int) or n <= 0 for n in self.stage_sizes)):
      raise ValueError(
          f"stage_sizes must be a non-empty sequence of positive ints; got "
          f"{self.stage_sizes!r}.")
    if self.stem not in STEMS:
      raise ValueError(f"stem must be one of {list(STEMS)}; got {self.stem!r}.")
    if (not isinstance(self.stem_pool, int) or isinstance(self.stem_pool, bool)
        or self.stem_pool <= 0):
      raise ValueError(f"stem_pool must be a positive int (1: no pooling); got "
                       f"{self.stem_pool!r}.")
    if self.stem_pool > 1 and not self.small_inputs:
      raise ValueError(f"stem_pool={self.stem_pool} applies to the small-input stems "
                       f"only: set small_inputs=True or stem_pool=1.")
    # Build the attention layers detached: their own checks (heads dividing the width,
    # odd kernel, known positional mode and implementation) run now, before any tracing.
    for stage, spatial in enumerate(self.stage_spatial_layers()):
      if spatial == "attention":
        self._attention(stage)(self.width * 2**stage, parent=None)
    if self.stem == "attention":
      self._attention_stem(parent=None)
    super().__post_init__()

  def stage_spatial_layers(self) -> tuple[str, ...]:
    """The spatial layer of each stage; ValueError for an invalid ``spatial``."""
    if isinstance(self.spatial, str):
      layers = (self.spatial,) * len(self.stage_sizes)
    else:
      layers = tuple(self.spatial)
    if len(layers) != len(self.stage_sizes) or any(s not in SPATIAL_LAYERS for s in layers):
      raise ValueError(
          f"spatial must be one of {list(SPATIAL_LAYERS)}, or a sequence of them with one "
          f"entry per stage ({len(self.stage_sizes)} stages); got {self.spatial!r}.")
    return layers

  def stage_dilations(self) -> tuple[int, ...]:
    """The dilation of each stage's attention; ValueError for an invalid ``dilation``."""
    if isinstance(self.dilation, Sequence):
      dilations = tuple(self.dilation)
    else:
      dilations = (self.dilation,) * len(self.stage_sizes)
    if len(dilations) != len(self.stage_sizes) or any(
        not isinstance(d, int) or isinstance(d, bool) or d < 1 for d in dilations):
      raise ValueError(
          f"dilation must be an int >= 1, or a sequence of them with one entry per stage "
          f"({len(self.stage_sizes)} stages); got {self.dilation!r}.")
    return dilations

  def _attention(self, stage: int) -> ModuleDef:
    """``LocalSelfAttention`` with the model's settings for ``stage``."""
    return functools.partial(
        LocalSelfAttention, num_heads=self.num_heads, kernel_size=self.kernel_size,
        dilation=self.stage_dilations()[stage], borders=self.borders,
        positional=self.positional, content=self.content,
        implementation=self.implementation, dtype=self.dtype, param_dtype=self.param_dtype)

  @property
  def _attention_stem(self) -> ModuleDef:
    return functools.partial(
        AttentionStem, self.width, num_heads=self.stem_heads,
        block_size=self.stem_block_size, num_mixtures=self.stem_mixtures, dtype=self.dtype,
        param_dtype=self.param_dtype)

  def _stem(self, x: jax.Array, conv: ModuleDef, norm: ModuleDef) -> jax.Array:
    """``(B, H, W, C) -> (B, H', W', width)``, see the class docstring."""
    pools_blocks = not self.small_inputs or self.stem_pool == self.stem_block_size
    if self.stem == "attention" and pools_blocks:
      # BatchNorm, ReLU and the pooling need only each block's extremes and each
      # channel's moments: the stem's kernels never write its full-resolution output.
      stats = self._attention_stem(name="stem_attention")(x, block_statistics=True)
      return PooledBatchNorm(**norm.keywords, name="stem_bn")(stats)
    if self.stem == "attention":
      x = self._attention_stem(name="stem_attention")(x)
    elif self.small_inputs:
      x = conv(self.width, (3, 3), name="stem_conv")(x)
    else:
      x = conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    if self.small_inputs:
      pool = (self.stem_pool,) * 2
      return nn.max_pool(x, pool, strides=pool) if self.stem_pool > 1 else x
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """``(B, H, W, C)`` float images -> ``(B, num_classes)`` float32 logits.

    ``train`` selects batch statistics (and updates ``batch_stats``, which must then be
    mutable) over the running averages.
    """
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=_conv_init,
                             dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)
    x = self._stem(x, conv, norm)
    for stage, (num_blocks, spatial) in enumerate(
        zip(self.stage_sizes, self.stage_spatial_layers())):
      for block in range(num_blocks):
        x = BottleneckBlock(
            width=self.width * 2**stage, stride=2 if stage > 0 and block == 0 else 1,
            spatial=spatial, conv=conv, norm=norm, attention=self._attention(stage),
            name=f"stage{stage + 1}_block{block + 1}")(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="head")(x)
    return jnp.asarray(x, jnp.float32)
