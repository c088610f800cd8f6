"""Flax (linen) modules of SASA: the local self-attention layer and the attention stem.

Inputs and outputs are NHWC: ``(B, H, W, C)``. Paper: Ramachandran et al., "Stand-Alone
Self-Attention in Vision Models", NeurIPS 2019, §3 (layer) and §3.2 (stem).
"""

from __future__ import annotations

import functools
from typing import Any

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sasa_jax import ops

POSITIONAL_MODES = ("relative", "absolute", "none")

Dtype = Any


def _check_input(name: str, x) -> None:
  if getattr(x, "ndim", None) != 4:
    raise ValueError(
        f"{name} expects images of rank 4, shape (B, H, W, C) (NHWC); got shape "
        f"{getattr(x, 'shape', None)}.")


def _check_positive_int(name: str, value) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"{name} must be a positive int; got {value!r}.")


def _check_heads(features, num_heads) -> None:
  """Both positive ints, ``num_heads`` dividing ``features``."""
  _check_positive_int("features", features)
  _check_positive_int("num_heads", num_heads)
  if features % num_heads:
    raise ValueError(
        f"features must be divisible by num_heads; got features={features}, "
        f"num_heads={num_heads} (allowed num_heads: divisors of {features}).")


def _head_projection(num_heads: int, head_depth: int, use_bias: bool, dtype: Dtype,
                     param_dtype: Dtype, name: str) -> nn.DenseGeneral:
  """A full-width 1x1 projection ``(B, H, W, C) -> (B, H, W, N, d)``."""
  return nn.DenseGeneral(features=(num_heads, head_depth), use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype, name=name)


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
  stride: int = 1
  positional: str = "relative"
  content: bool = True
  use_bias: bool = False
  max_size: int = 64
  implementation: str | None = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_heads(self.features, self.num_heads)
    if self.positional not in POSITIONAL_MODES:
      raise ValueError(
          f"positional must be one of {list(POSITIONAL_MODES)}; got {self.positional!r}.")
    if self.positional != "none" and (self.features // self.num_heads) % 2:
      raise ValueError(
          f"positional={self.positional!r} splits the head depth d = features/num_heads into "
          f"row and column halves, so d must be even; got d={self.features // self.num_heads}.")
    if self.kernel_size is not None:
      ops.window_shape(self.kernel_size)
    if not isinstance(self.stride, int) or self.stride <= 0:
      raise ValueError(f"stride must be a positive int (1, or 2 to downsample); got "
                       f"{self.stride!r}.")
    ops.check_implementation(self.implementation)
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
    """``rel_h (kh, d/2)`` and ``rel_w (kw, d/2)``; for global attention, the centre of
    ``(2 * max_size - 1, d/2)`` tables."""
    init = nn.initializers.normal(stddev=(2 * half)**-0.5)
    if self.kernel_size is None:
      full = 2 * self.max_size - 1
      rel_h = self.param("rel_h", init, (full, half), self.param_dtype)
      rel_w = self.param("rel_w", init, (full, half), self.param_dtype)
      return (rel_h[self.max_size - 1 - kh // 2:self.max_size + kh // 2],
              rel_w[self.max_size - 1 - kw // 2:self.max_size + kw // 2])
    return (self.param("rel_h", init, (kh, half), self.param_dtype),
            self.param("rel_w", init, (kw, half), self.param_dtype))

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
    ``(B, H, W, N, kh, kw)`` (see ``ops.attention_weights``).
    """
    _check_input("LocalSelfAttention", x)
    batch, height, width, _ = x.shape
    depth = self.features // self.num_heads
    kh, kw = self._window(height, width)
    project = functools.partial(_head_projection, self.num_heads, depth, self.use_bias,
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

    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "attention_weights",
               ops.attention_weights(query, key, kernel_size=(kh, kw), rel_h=rel_h,
                                     rel_w=rel_w))
    out = ops.local_attention(query, key, value, kernel_size=(kh, kw), rel_h=rel_h,
                              rel_w=rel_w, implementation=self.implementation)
    out = out.reshape(batch, height, width, self.features)
    if self.stride > 1:
      out = nn.avg_pool(out, (self.stride, self.stride), strides=(self.stride, self.stride))
    return out


class _HeadProjectionWeights(nn.Module):
  """The parameters of ``_head_projection`` (``kernel`` ``(C, N, d)``, ``bias`` ``(N, d)``,
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


class AttentionStem(nn.Module):
  """The paper's attention stem (§3.2): attention with spatially-aware values.

  Each pixel attends to the pixels of its ``block_size x block_size`` block (the blocks
  tile the image and align with the max-pooling that follows in the model). Queries and
  keys are ordinary 1x1 projections (params ``query``, ``key``, as in
  ``LocalSelfAttention``); the value of key pixel ``(a, b)`` (its position inside the
  block) is a position-dependent mixture of ``num_mixtures`` value projections (param
  ``value``, ``(m, C, features)``)::

      v_ab = sum_m p(a, b, m) W_V^m x_ab,
      p(a, b, m) = softmax_m((emb_row[a] + emb_col[b]) . nu[m])

  with ``emb_row``, ``emb_col`` ``(block_size, mixture_features)`` and ``nu``
  ``(num_mixtures, mixture_features)`` learned; ``p`` is shared across heads. The module
  is the attention alone: the model follows it with BatchNorm, ReLU and
  ``block_size x block_size`` max-pooling. With the ``intermediates`` collection mutable
  it sows its ``attention_weights`` in ``LocalSelfAttention``'s window format (see
  ``__call__``), for ``sasa_jax.attention_maps``.

  Computed without forming q, k or v, which would be ``features`` wide at the full input
  resolution for a ``C = 3`` input. Per head, with ``x~ = [x, 1]`` when ``use_bias`` (else
  ``x``) and the projections' kernels with their bias rows ``W~_Q``, ``W~_K``::

      q_i . k_j = x~_i^T (W~_Q W~_K^T) x~_j,                          a C-term dot
      sum_j softmax_j(.) v_j = sum_m W_V^m (sum_j softmax_j(.) p(j, m) x_j)

  the same function, in ``C``-wide rather than ``d``-wide contractions (cheaper while
  ``C < d``, as for RGB input), and the value projections become one matmul of the
  attended inputs.

  Attributes:
    features: output channels (the stem's width, 64 in the paper's ResNets).
    num_heads: attention heads (paper: 4).
    block_size: the spatial extent of the attention (paper: 4); H and W must be multiples.
    num_mixtures: value projections mixed, ``m`` (the paper does not state it; 4 is the
      common choice).
    mixture_features: the width of the position and mixture embeddings.
    use_bias: biases on the query and key projections.
    dtype: computation dtype (``None``: the input's); logits and softmax run in float32.
    param_dtype: parameter dtype.
  """

  features: int = 64
  num_heads: int = 4
  block_size: int = 4
  num_mixtures: int = 4
  mixture_features: int = 16
  use_bias: bool = False
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    for name in ("block_size", "num_mixtures", "mixture_features"):
      _check_positive_int(name, getattr(self, name))
    _check_heads(self.features, self.num_heads)
    super().__post_init__()

  def _mixture_weights(self) -> jax.Array:
    """``p``: ``(block_size, block_size, num_mixtures)``, summing to 1 over mixtures."""
    init = nn.initializers.normal(stddev=1.0)
    shape = (self.block_size, self.mixture_features)
    emb_row = self.param("emb_row", init, shape, self.param_dtype)
    emb_col = self.param("emb_col", init, shape, self.param_dtype)
    nu = self.param("mixture_embedding", init, (self.num_mixtures, self.mixture_features),
                    self.param_dtype)
    position = emb_row[:, None, :] + emb_col[None, :, :]
    return jax.nn.softmax(jnp.einsum("abe,me->abm", position.astype(jnp.float32),
                                     nu.astype(jnp.float32)), axis=-1)

  def _query_key_form(self, channels: int) -> jax.Array:
    """``(C~, N, C~)``: per head, ``W~_Q W~_K^T / sqrt(d)`` (``C~ = C + use_bias``)."""
    depth = self.features // self.num_heads
    weights = functools.partial(_HeadProjectionWeights, self.num_heads, depth, self.use_bias,
                                self.param_dtype)
    w_query = weights(name="query")(channels).astype(jnp.float32)
    w_key = weights(name="key")(channels).astype(jnp.float32)
    return jnp.einsum("cnd,end->cne", w_query, w_key) * depth**-0.5

  def _value_projection(self, channels: int) -> jax.Array:
    """``(N * m * C, features)``: head ``n``'s ``(m * C, d)`` value kernels on the diagonal."""
    kernels = self.param("value", nn.initializers.lecun_normal(batch_axis=(0,)),
                         (self.num_mixtures, channels, self.features), self.param_dtype)
    heads = kernels.reshape(self.num_mixtures * channels, self.num_heads, -1)
    return jax.scipy.linalg.block_diag(*(heads[:, n] for n in range(self.num_heads)))

  def _windows(self, probs: jax.Array) -> jax.Array:
    """Block attention ``(B, X, Y, N * P, P)`` -> ``(B, H, W, N, 2b - 1, 2b - 1)``.

    The window of ``LocalSelfAttention``'s sown weights, centred on the query: entry
    ``[.., i, j, n, a, c]`` is what head ``n`` of pixel ``(i, j)`` gives to pixel
    ``(i + a - (b - 1), j + c - (b - 1))``, which is zero outside the query's block. A
    ``2b - 1`` window is the smallest that holds the block of every query position.
    """
    b = self.block_size
    probs = einops.rearrange(probs, "B x y (n p q) (r s) -> B x y n p q r s",
                             n=self.num_heads, p=b, q=b, r=b, s=b)
    # place[p, r, a] = 1 where key row r of the block is at window row a from query row p.
    rows = jnp.arange(b)
    place = (rows[None, :, None] - rows[:, None, None] + b - 1 ==
             jnp.arange(2 * b - 1)[None, None, :]).astype(probs.dtype)
    windows = jnp.einsum("Bxynpqrs,pra,qsc->Bxpyqnac", probs, place, place)
    return einops.rearrange(windows, "B x p y q n a c -> B (x p) (y q) n a c")

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """``(B, H, W, C)`` -> ``(B, H, W, features)``; H and W multiples of ``block_size``.

    With the ``intermediates`` collection mutable, also sows ``attention_weights``
    ``(B, H, W, N, 2 * block_size - 1, 2 * block_size - 1)``: each pixel's attention in
    the window format of ``LocalSelfAttention`` (centred on the pixel), non-zero only on
    the pixel's own block (see ``_windows``).
    """
    _check_input("AttentionStem", x)
    batch, height, width, channels = x.shape
    if height % self.block_size or width % self.block_size:
      raise ValueError(
          f"AttentionStem attends within {self.block_size}x{self.block_size} blocks, so the "
          f"image height and width must be multiples of block_size={self.block_size}; got "
          f"{height}x{width}.")
    dtype = self.dtype or x.dtype
    blocks = dict(p=self.block_size, q=self.block_size)
    # (B, X, Y, P, C): the P = block_size**2 pixels of each block, row-major.
    pixels = einops.rearrange(x.astype(dtype), "b (x p) (y q) c -> b x y (p q) c", **blocks)
    augmented = pixels
    if self.use_bias:
      augmented = jnp.concatenate([pixels, jnp.ones_like(pixels[..., :1])], axis=-1)

    # Logits (B, X, Y, N * P, P): row (n, i) holds head n's q_i . k_j / sqrt(d) over keys j.
    form = self._query_key_form(channels).astype(dtype)
    mapped = jnp.einsum("bxyic,cne->bxynie", augmented, form)
    mapped = mapped.reshape(mapped.shape[:3] + (-1, mapped.shape[-1]))
    logits = jnp.einsum("bxyke,bxyje->bxykj", mapped, augmented,
                        preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)
    if self.is_mutable_collection("intermediates"):
      self.sow("intermediates", "attention_weights", self._windows(probs))
    probs = probs.astype(dtype)

    # (B, X, Y, P, m * C): key j's input weighted by each mixture p(j, m); attended per
    # (head, query) row, then all heads' value projections as one matmul.
    mixture = self._mixture_weights().reshape(-1, self.num_mixtures).astype(dtype)
    mixed = jnp.einsum("jm,bxyjc->bxyjmc", mixture, pixels)
    mixed = mixed.reshape(mixed.shape[:4] + (-1,))
    attended = jnp.einsum("bxykj,bxyjf->bxykf", probs, mixed)
    attended = einops.rearrange(attended, "b x y (n p q) f -> (b x p y q) (n f)",
                                n=self.num_heads, **blocks)
    out = attended @ self._value_projection(channels).astype(dtype)
    return out.reshape(batch, height, width, self.features)
