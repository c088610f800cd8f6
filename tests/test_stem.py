"""The attention stem's block statistics: the TPU kernels (Pallas's TPU interpret mode)
against the XLA formulation, and ``PooledBatchNorm`` against BatchNorm, ReLU and
max-pooling of the full output. (The XLA formulation against the paper's formula:
tests/test_layers.py.)"""

import functools

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import TOLERANCE, rel_error

from sasa_jax.layers import PooledBatchNorm
from sasa_jax.ops import stem

# (B, H, W, C, use_bias, block, heads, mixtures, features), dtype: odd, non-square images;
# blocks of 2 and 3 (9 positions); the last spans two kernel instances (648 blocks, 512
# per instance), the lanes padded. Each dtype with and without the bias channel.
CASES = [((2, 6, 10, 3, True, 2, 3, 2, 12), jnp.float32),  # The fast subset's case.
         *(pytest.param(*case, marks=pytest.mark.slow) for case in [
             ((2, 6, 10, 3, True, 2, 3, 2, 12), jnp.bfloat16),
             ((1, 9, 6, 2, False, 3, 2, 3, 8), jnp.bfloat16),
             ((3, 36, 24, 1, True, 2, 2, 2, 4), jnp.float32)])]


def _arguments(shape, dtype, seed=0):
  """``block_statistics``'s arguments: the input (with its bias channel of ones), a
  query-key form, mixture weights (rows summing to 1) and a value projection."""
  batch, height, width, channels, use_bias, block, heads, mixtures, features = shape
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.normal(keys[0], (batch, height, width, channels))
  if use_bias:
    x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1)
  augmented = x.shape[-1]
  form = jax.random.normal(keys[1], (augmented, heads, augmented))
  mixture = jax.nn.softmax(jax.random.normal(keys[2], (block * block, mixtures)), axis=-1)
  values = jax.random.normal(keys[3], (heads * mixtures * channels, features))
  return [a.astype(dtype).astype(jnp.float32) for a in (x, form, mixture, values)], block


def _xla(x, form, mixture, values, *, block, dtype):
  """The XLA formulation in float32, its output rounded to ``dtype`` as the kernels'."""
  out = stem.block_attention(x, form, mixture, values, block=block)[0]
  return stem.statistics_of(out.astype(dtype), block)


@pytest.mark.parametrize("shape, dtype", CASES, ids=lambda a: (
    "x".join(map(str, a[:3])) if isinstance(a, tuple) else jnp.dtype(a).name))
def test_the_kernels_compute_the_statistics_and_their_gradients(shape, dtype):
  """Every statistic and the gradient of a random linear function of them with respect
  to every argument. bf16 runs take the bf16-rounded input and round the output to
  bf16, against the float32 formulation on the same rounded arguments, its output
  rounded alike (so that both find the same extremes)."""
  (x, *params), block = _arguments(shape, dtype)
  kernels = functools.partial(stem.block_statistics, block=block, interpret=True)
  xla = functools.partial(_xla, block=block, dtype=dtype)
  got = kernels(x.astype(dtype), *params)
  want = xla(x, *params)
  assert got.maximum.dtype == got.minimum.dtype == dtype
  for got_stat, want_stat in zip(got, want):
    assert got_stat.shape == want_stat.shape
    assert rel_error(got_stat, want_stat) < TOLERANCE[dtype]
  assert np.all(np.asarray(got.maximum, np.float32) >= np.asarray(got.minimum, np.float32))
  cotangents = [jax.random.normal(jax.random.PRNGKey(i), s.shape) for i, s in enumerate(want)]

  def loss(fn, x, *params):
    return sum(jnp.sum(s.astype(jnp.float32) * c) for s, c in zip(fn(x, *params), cotangents))

  got = jax.grad(functools.partial(loss, kernels), argnums=(0, 1, 2, 3))(x.astype(dtype),
                                                                          *params)
  want = jax.grad(functools.partial(loss, xla), argnums=(0, 1, 2, 3))(x, *params)
  for got_grad, want_grad in zip(got, want):
    assert rel_error(got_grad, want_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_pooled_batch_norm_is_batch_norm_relu_and_max_pooling(dtype, train):
  """Same variables, the same numbers (bit for bit in the forward pass: one value per
  block goes through the very same operations), the same running statistics and, with
  negative scales among the channels, the same gradients."""
  # Within each 3x3 block the values are a shuffle of 0..8 (plus a per-block offset), so
  # that no two pixels of a block tie, even once normalized and rounded to bfloat16
  # (where the pooling's gradient could pick either).
  ranks = jax.vmap(lambda key: jax.random.permutation(key, 9))(
      jax.random.split(jax.random.PRNGKey(0), 2 * 2 * 3 * 5))
  offsets = jax.random.normal(jax.random.PRNGKey(4), (2 * 2 * 3 * 5, 1))
  y = einops.rearrange(ranks + offsets, "(b x y f) (p q) -> b (x p) (y q) f", b=2, x=2, y=3,
                       p=3).astype(dtype)
  norm = dict(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)
  reference = nn.BatchNorm(**norm)
  pooled = PooledBatchNorm(**norm)
  stats = stem.statistics_of(y, 3)
  variables = reference.init(jax.random.PRNGKey(1), y)
  assert jax.tree.map(jnp.shape, pooled.init(jax.random.PRNGKey(1), stats)) == jax.tree.map(
      jnp.shape, variables)
  variables = jax.tree.map(
      lambda a: a + jax.random.normal(jax.random.PRNGKey(2), a.shape), variables)
  variables["params"]["scale"] = jnp.array([-1.5, -0.6, 0.4, 1.1, 2.0])
  variables["batch_stats"]["var"] = jnp.abs(variables["batch_stats"]["var"])

  def ours(variables, y):
    return pooled.apply(variables, stem.statistics_of(y, 3), mutable=["batch_stats"])

  def theirs(variables, y):
    out, updated = reference.apply(variables, y, mutable=["batch_stats"])
    return nn.max_pool(nn.relu(out), (3, 3), strides=(3, 3)), updated

  (got, got_stats), (want, want_stats) = ours(variables, y), theirs(variables, y)
  assert got.dtype == want.dtype == dtype and got.shape == (2, 2, 3, 5)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
  for got_stat, want_stat in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
    np.testing.assert_allclose(got_stat, want_stat, rtol=1e-6)
  cotangent = jax.random.normal(jax.random.PRNGKey(3), got.shape)

  def loss(fn, variables, y):
    return jnp.sum(fn(variables, y)[0].astype(jnp.float32) * cotangent)

  got = jax.grad(functools.partial(loss, ours), argnums=(0, 1))(variables, y)
  want = jax.grad(functools.partial(loss, theirs), argnums=(0, 1))(variables, y)
  for got_grad, want_grad in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_error(got_grad, want_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("setting", [dict(use_scale=False), dict(axis=1),
                                     dict(use_fast_variance=False), dict(axis_name="batch")])
def test_pooled_batch_norm_refuses_settings_it_does_not_compute(setting):
  with pytest.raises(ValueError) as error:
    PooledBatchNorm(use_running_average=False, **setting)
  (key, value), = setting.items()
  assert f"'{key}': {value!r}" in str(error.value)
