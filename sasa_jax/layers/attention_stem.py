"""The paper's attention stem (§3.2): attention within blocks, with spatially-aware values.

Inputs and outputs are NHWC: ``(B, H, W, C)``.
"""

from __future__ import annotations

import functools

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from sasa_jax.layers import common
from sasa_jax.ops import stem


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

  Computed by ``sasa_jax.ops.stem`` in ``C``-wide rather than ``d``-wide contractions
  (cheaper while ``C < d``, as for RGB input). Called with ``block_statistics=True`` it
  returns what the model's BatchNorm, ReLU and block max-pooling need of its output
  (``ops.stem.BlockStatistics``), computed on TPU by kernels that never write the full
  ``(B, H, W, features)`` output to memory.

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
  dtype: common.Dtype | None = None
  param_dtype: common.Dtype = jnp.float32

  def __post_init__(self):
    for name in ("block_size", "num_mixtures", "mixture_features"):
      common.check_positive_int(name, getattr(self, name))
    common.check_heads(self.features, self.num_heads)
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
    weights = functools.partial(common.HeadProjectionWeights, self.num_heads, depth, self.use_bias,
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
  def __call__(self, x: jax.Array,
               block_statistics: bool = False) -> jax.Array | stem.BlockStatistics:
    """``(B, H, W, C)`` -> ``(B, H, W, features)``; H and W multiples of ``block_size``.

    With ``block_statistics``, the output's ``stem.BlockStatistics`` instead: each
    ``block_size`` block's maximum and minimum ``(B, H / b, W / b, features)``, and the
    mean and mean square of each channel over the batch and every pixel.

    With the ``intermediates`` collection mutable, also sows ``attention_weights``
    ``(B, H, W, N, 2 * block_size - 1, 2 * block_size - 1)``: each pixel's attention in
    the window format of ``LocalSelfAttention`` (centred on the pixel), non-zero only on
    the pixel's own block (see ``_windows``); the statistics are then computed from the
    output in XLA.
    """
    common.check_input("AttentionStem", x)
    channels = x.shape[-1]
    if x.shape[1] % self.block_size or x.shape[2] % self.block_size:
      raise ValueError(
          f"AttentionStem attends within {self.block_size}x{self.block_size} blocks, so the "
          f"image height and width must be multiples of block_size={self.block_size}; got "
          f"{x.shape[1]}x{x.shape[2]}.")
    dtype = self.dtype or x.dtype
    x = x.astype(dtype)
    if self.use_bias:
      x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
    arguments = (x, self._query_key_form(channels),
                 self._mixture_weights().reshape(-1, self.num_mixtures),
                 self._value_projection(channels))
    sow = self.is_mutable_collection("intermediates")
    if block_statistics and not sow:
      return stem.block_statistics(*arguments, block=self.block_size)
    out, probs = stem.block_attention(*arguments, block=self.block_size)
    if sow:
      self.sow("intermediates", "attention_weights", self._windows(probs))
    return stem.statistics_of(out, self.block_size) if block_statistics else out
