"""Analytic parameter and FLOP counts of a model, from shapes alone (``jax.eval_shape``).

FLOPs are 2 x multiply-adds (MACs) of the layers that carry weights; BatchNorm, ReLU,
pooling and residual additions are ignored. The convention reproduces the paper's Table 1:

* convolution: ``kh * kw * C_in / groups * C_out`` MACs per output pixel; dense: ``C_in *
  C_out`` per output position;
* ``LocalSelfAttention``: its 1x1 projections (``C_in * features`` each: query, value and,
  with the content term, key) plus ``k^2 * features`` per attention term (p.v always; q.k
  with the content term or absolute positions, which are added to the keys; q.r with
  relative positions), per pixel at the input resolution, i.e. before the pooling of a
  strided layer. Global attention has ``k^2 = H * W``. Border windows count in full.
* ``AttentionStem``: per pixel, the query and key projections (``2 * C * F``), the value
  mixture (``m * C * F``) and attention over the ``b^2`` keys of its block (``2 * b^2 *
  F``: q.k and p.v).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sasa_jax import ops
from sasa_jax.layers import AttentionStem, LocalSelfAttention


def _attention_macs(layer: LocalSelfAttention, x: jax.Array) -> int:
  batch, height, width, channels = x.shape
  if layer.kernel_size is None:
    window = height * width
  else:
    window = math.prod(ops.window_shape(layer.kernel_size))
  projections = 3 if layer.content else 2
  terms = 1 + (layer.content or layer.positional == "absolute") + (
      layer.positional == "relative")
  pixels = batch * height * width
  return pixels * layer.features * (projections * channels + terms * window)


def _stem_macs(stem: AttentionStem, x: jax.Array) -> int:
  batch, height, width, channels = x.shape
  per_pixel = stem.features * ((2 + stem.num_mixtures) * channels + 2 * stem.block_size**2)
  return batch * height * width * per_pixel


def _linear_macs(layer: nn.Module, y: jax.Array) -> int:
  """MACs of a Conv, Dense or DenseGeneral: each output element costs its fan-in, the
  kernel's size over its output features."""
  kernel = layer.get_variable("params", "kernel")
  features = layer.features if isinstance(layer.features, Sequence) else (layer.features,)
  return y.size * (kernel.size // math.prod(features))


def count(model: nn.Module, input_shape: Sequence[int], **call_kwargs) -> dict[str, int]:
  """``{'params': int, 'flops': int}`` of ``model`` on inputs of ``input_shape``.

  Nothing is allocated or compiled: ``model.init`` runs under ``jax.eval_shape`` with an
  interceptor that adds up the MACs of every Conv, Dense, DenseGeneral,
  ``LocalSelfAttention`` and ``AttentionStem`` call (the attention layers by the formulas
  above, without descending into their projections). ``params`` counts the ``params``
  collection (BatchNorm statistics excluded). ``call_kwargs`` go to ``model.__call__``.
  """
  macs = 0
  inside_attention = False

  def interceptor(next_fun, args, kwargs, context):
    nonlocal macs, inside_attention
    layer = context.module
    if context.method_name != "__call__" or inside_attention:
      return next_fun(*args, **kwargs)
    if isinstance(layer, (LocalSelfAttention, AttentionStem)):
      inside_attention = True
      try:
        y = next_fun(*args, **kwargs)
      finally:
        inside_attention = False
      macs += (_attention_macs if isinstance(layer, LocalSelfAttention) else _stem_macs)(
          layer, args[0])
      return y
    y = next_fun(*args, **kwargs)
    if isinstance(layer, (nn.Conv, nn.Dense, nn.DenseGeneral)):
      macs += _linear_macs(layer, y)
    return y

  if "implementation" in {field.name for field in dataclasses.fields(model)}:
    # The counts depend on shapes alone; 'reference' (every option, a few gathers) traces
    # in a fraction of the time of the automatic choice on CPU ('shifted' unrolls k^2
    # shifts, forward and backward).
    model = model.clone(implementation="reference")
  x = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  with nn.intercept_methods(interceptor):
    variables = jax.eval_shape(
        lambda x: model.init(jax.random.key(0), x, **call_kwargs), x)
  params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
  return {"params": int(params), "flops": 2 * int(macs)}


def human(n: float) -> str:
  """A count in a few characters: ``13696552 -> '13.70M'``, ``9440000000 -> '9.44G'``."""
  for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
    if n >= scale:
      return f"{n / scale:.2f}{unit}"
  return f"{n:.0f}"
