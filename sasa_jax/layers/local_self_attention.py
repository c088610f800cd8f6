"""The SASA layer (paper §3): multi-head local self-attention over a ``k x k`` memory block.

Inputs and outputs are NHWC: ``(B, H, W, C)``.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from sasa_jax import ops
from sasa_jax.layers import common

POSITIONAL_MODES = ("relative", "absolute", "none")


class LocalSelfAttention(nn.Module):
  """The SASA layer (paper §3): multi-head attention over a ``k x k`` memory block.

  Queries, keys and values are full-width 1x1 projections of the input (params ``query``,
  ``key``, ``value``, kernels ``(C, N, d)`` with ``d = features / num_heads``), split into
  ``num_heads`` heads; each pixel attends to the pixels of its window with 2-D relative
  position logits (``ops.local_attention``). There is no output projection: as in the
  paper, the layer stands where a spatial convolution was.

  Attributes:
    features: output channels; must be divisible by ``num_heads``.
    num_heads: attention heads (paper: 8).
    kernel_size: the odd spatial extent ``k`` (or ``(kh, kw)``) of the memory block (paper:
      7). ``None`` is global attention over the whole feature map, the seed article's
      variant: its relative tables then cover offsets up to ``max_size - 1``, so H and W
      must not exceed ``max_size``.
    dilation: an int ``>= 1`` (or ``(dh, dw)``): the window's pixels are that far apart
      (DiNAT's dilation; not in the paper).
    borders: ``'exclude'`` (the paper's: pixels outside the image are left out of the
      window) or ``'shift'`` (NATTEN's neighbourhood attention: the window shifts to stay
      inside the image; its relative tables have ``2 kh - 1`` and ``2 kw - 1`` rows). See
      ``ops.local_attention``.
    stride: ``s > 1`` downsamples like a stride-``s`` conv, the paper's way: attention at
      the input resolution, then ``s x s`` average pooling with stride ``s`` (floor: an odd
      H loses its last row).
    positional: ``'relative'`` (the paper's row/column offset embeddings ``rel_h``
      ``(kh, d/2)`` and ``rel_w`` ``(kw, d/2)``, shared across heads), ``'absolute'``
      (learned embeddings ``abs_h`` ``(max_size, d/2)`` and ``abs_w`` of the key's row and
      column in the feature map, concatenated and added to the keys, so that the logit
      gains ``q[:d/2] . abs_h[a] + q[d/2:] . abs_w[b]``), or ``'none'``: the paper's
      positional-encoding ablation. Needs an even ``d`` unless ``'none'``.
    content: ``False`` drops the content-content term ``q . k`` (the paper's "q.r only"
      ablation): the layer then has no ``key`` projection.
    use_bias: biases on the q/k/v projections (the paper has none).
    max_size: the largest H or W accepted with ``kernel_size=None`` or
      ``positional='absolute'`` (sizes their tables).
    implementation: forwarded to ``ops.local_attention`` (``None``: automatic).
    dtype: computation dtype (``None``: the input's); logits and softmax run in float32.
    param_dtype: parameter dtype.
  """

  features: int
  num_heads: int = 8
  kernel_size: int | tuple[int, int] | None = 7
  dilation: int | tuple[int, int] = 1
  borders: str = "exclude"
  stride: int = 1
  positional: str = "relative"
  content: bool = True
  use_bias: bool = False
  max_size: int = 64
  implementation: str | None = None
  dtype: common.Dtype | None = None
  param_dtype: common.Dtype = jnp.float32

  def __post_init__(self):
    common.check_heads(self.features, self.num_heads)
    if self.positional not in POSITIONAL_MODES:
      raise ValueError(
          f"positional must be one of {list(POSITIONAL_MODES)}; got {self.positional!r}.")
    if self.positional != "none" and (self.features // self.num_heads) % 2:
      raise ValueError(
          f"positional={self.positional!r} splits the head depth d = features/num_heads into "
          f"row and column halves, so d must be even; got d={self.features // self.num_heads}.")
    if self.kernel_size is not None:
      ops.check_window(self.kernel_size, self.dilation, self.borders)
    elif self.dilation != 1 or self.borders != "exclude":
      raise ValueError(
          f"kernel_size=None (global attention) takes the default dilation=1 and "
          f"borders='exclude'; got dilation={self.dilation!r}, borders={self.borders!r}.")
    if not isinstance(self.stride, int) or self.stride <= 0:
      raise ValueError(f"stride must be a positive int (1, or 2 to downsample); got "
                       f"{self.stride!r}.")
    ops.check_implementation(self.implementation, self.borders)
    super().__post_init__()

  def _window(self, height: int, width: int) -> tuple[int, int]:
    if self.kernel_size is None:
      if max(height, width) > self.max_size:
        raise ValueError(
            f"kernel_size=None (global attention) supports feature maps up to max_size="
            f"{self.max_size}; got {height}x{width}. Raise max_size.")
      return 2 * height - 1, 2 * width - 1
    return ops.window_shape(self.kernel_size)

  def _relative_tables(self, kh: int, kw: int, half: int):
    """``rel_h (kh, d/2)`` and ``rel_w (kw, d/2)`` (with shifted borders ``2 kh - 1`` and
    ``2 kw - 1`` rows); for global attention, the centre of ``(2 * max_size - 1, d/2)``
    tables."""
    init = nn.initializers.normal(stddev=(2 * half)**-0.5)
    if self.kernel_size is None:
      full = 2 * self.max_size - 1
      rel_h = self.param("rel_h", init, (full, half), self.param_dtype)
      rel_w = self.param("rel_w", init, (full, half), self.param_dtype)
      return (rel_h[self.max_size - 1 - kh // 2:self.max_size + kh // 2],
              rel_w[self.max_size - 1 - kw // 2:self.max_size + kw // 2])
    rows_h, rows_w = ops.relative_table_rows((kh, kw), self.borders)
    return (self.param("rel_h", init, (rows_h, half), self.param_dtype),
            self.param("rel_w", init, (rows_w, half), self.param_dtype))

  def _absolute_embeddings(self, height: int, width: int, half: int):
    """``(H, W, d)``: the row embedding of each pixel concatenated with its column one."""
    if max(height, width) > self.max_size:
      raise ValueError(
          f"positional='absolute' supports feature maps up to max_size={self.max_size}; got "
          f"{height}x{width}. Raise max_size.")
    init = nn.initializers.normal(stddev=(2 * half)**-0.5)
    abs_h = self.param("abs_h", init, (self.max_size, half), self.param_dtype)[:height]
    abs_w = self.param("abs_w", init, (self.max_size, half), self.param_dtype)[:width]
    return jnp.concatenate([
        jnp.broadcast_to(abs_h[:, None], (height, width, half)),
        jnp.broadcast_to(abs_w[None, :], (height, width, half)),
    ], axis=-1)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, H // stride, W // stride, features)``.

    With the ``intermediates`` collection mutable, also sows ``attention_weights``
    ``(B, H, W, N, eh, ew)``: each pixel's weights in a window centred on it (``kh x kw``
    with the defaults; see ``ops.attention_weights``).
    """
    common.check_input("LocalSelfAttention", x)
    batch, height, width, _ = x.shape
    depth = self.features // self.num_heads
    kh, kw = self._window(height, width)
    project = functools.partial(common.head_projection, self.num_heads, depth, self.use_bias,
                                self.dtype, self.param_dtype)
    query = project("query")(x)
    value = project("value")(x)
    key = project("key")(x) if self.content else jnp.zeros_like(query)

    rel_h = rel_w = None
    if self.positional == "relative":
      rel_h, rel_w = self._relative_tables(kh, kw, depth // 2)
    elif self.positional == "absolute":
      key = key + self._absolute_embeddings(height, width, depth // 2)[:, :, None].astype(
          key.dtype)

    window = dict(kernel_size=(kh, kw), dilation=self.dilation, borders=self.borders)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "attention_weights",
               ops.attention_weights(query, key, **window, rel_h=rel_h, rel_w=rel_w))
    out = ops.local_attention(query, key, value, **window, rel_h=rel_h, rel_w=rel_w,
                              implementation=self.implementation)
    out = out.reshape(batch, height, width, self.features)
    if self.stride > 1:
      out = nn.avg_pool(out, (self.stride, self.stride), strides=(self.stride, self.stride))
    return out
