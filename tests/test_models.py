"""Tests of sasa_jax.models: shapes, BatchNorm modes, dtypes, Table 1 counts, registry."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sasa_jax import models
from sasa_jax.layers import AttentionStem, LocalSelfAttention
from sasa_jax.models import flops
from sasa_jax.models.__main__ import table

IMAGENET = [name for name in models.list_models() if models.get_config(name).paper]
# A narrow two-stage full-attention model: exercises the attention stem, strided
# attention and the projection shortcut at a size that compiles in seconds.
SMALL_SASA = dict(stage_sizes=(1, 1), width=16)


def _images(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _init(model, x, seed=0):
  return jax.jit(lambda x: model.init(jax.random.key(seed), x, train=False))(x)


def _apply(model):
  """``model.apply`` jitted (compiling beats op-by-op dispatch even for one call)."""
  return jax.jit(model.apply, static_argnames=("train", "mutable"))


def _param_shapes(model, shape):
  variables = jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False),
      jax.ShapeDtypeStruct(shape, jnp.float32))
  return variables["params"]


def _paths(tree):
  return {"/".join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _calls(model, shape, select):
  """``(module, input shape)`` of every ``__call__`` of a module that ``select`` accepts,
  when ``model`` runs on inputs of ``shape``."""
  found = []

  def record(next_fun, args, kwargs, context):
    if select(context.module) and context.method_name == "__call__":
      found.append((context.module, args[0].shape))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    _param_shapes(model, shape)
  return found


def _layers(model, shape, layer_type):
  """The instances of ``layer_type`` that ``model`` calls on inputs of ``shape``."""
  return [module for module, _ in _calls(model, shape, lambda m: isinstance(m, layer_type))]


def test_registry_names():
  names = models.list_models()
  for depth in (26, 38, 50):
    for pattern in ("resnet{}", "sasa_resnet{}_conv_stem", "sasa_resnet{}"):
      assert pattern.format(depth) in names
      assert pattern.format(depth) + "_cifar" in names
  assert {"sasa_tiny", "resnet_tiny"} <= set(names)
  assert {"resnet_fmnist", "sasa_fmnist_conv_stem", "sasa_fmnist"} <= set(names)
  assert len(names) == len(set(names)) == 23


# Tests of shapes alone trace with 'patches', and tests of what the model does around its
# attention (BatchNorm, training, bfloat16) compile 'dense': on CPU the automatic choice,
# 'shifted', takes 10-40x longer to trace and 3x longer to compile (the op tests cover
# every implementation).
_QUICK_TO_TRACE = {"implementation": "patches"}
_QUICK_TO_COMPILE = {"implementation": "dense"}


@pytest.mark.parametrize("name", models.list_models())
def test_output_shapes(name):
  config = models.get_config(name)
  size = min(config.image_size, 32)
  model = models.create(name, num_classes=7, **_QUICK_TO_TRACE)
  x = jax.ShapeDtypeStruct((2, size, size, config.in_channels), jnp.float32)
  logits = jax.eval_shape(
      lambda x: model.apply(model.init(jax.random.key(0), x, train=False), x, train=False),
      x)
  assert logits.shape == (2, 7)
  assert logits.dtype == jnp.float32


def test_batchnorm_train_and_eval_modes():
  model = models.create("sasa_tiny", **_QUICK_TO_COMPILE)
  x = _images((4, 8, 8, 1))
  variables = _init(model, x)
  apply = _apply(model)

  # Eval: running averages, so each image's logits do not depend on the rest of the batch.
  eval_logits = apply(variables, x, train=False)
  np.testing.assert_allclose(eval_logits[:2], apply(variables, x[:2], train=False),
                             rtol=1e-5, atol=1e-5)

  # Train: batch statistics, updated in the mutable batch_stats collection.
  train_logits, updates = apply(variables, x, train=True, mutable="batch_stats")
  half_logits, _ = apply(variables, x[:2], train=True, mutable="batch_stats")
  assert not np.allclose(train_logits[:2], half_logits, atol=1e-4)
  assert not np.allclose(train_logits, eval_logits, atol=1e-4)
  old, new = (_paths(v) for v in (variables["batch_stats"], updates["batch_stats"]))
  assert old.keys() == new.keys()
  means = [k for k in old if k.endswith("mean")]
  assert means and all(not np.allclose(old[k], new[k]) for k in means)
  with pytest.raises(flax.errors.ModifyScopeVariableError):  # Train mode updates them.
    apply(variables, x, train=True)


def test_bfloat16_forward_close_to_float32():
  x = _images((2, 16, 16, 3))
  model = models.create("sasa_resnet26_cifar", **SMALL_SASA, **_QUICK_TO_COMPILE)
  variables = _init(model, x)
  # Non-trivial BatchNorm scales, so that the residual branches contribute.
  variables = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.ones_like(v) if path[-1].key == "scale" else v, variables)
  f32 = _apply(model)(variables, x, train=False)
  bf16 = _apply(models.create("sasa_resnet26_cifar", dtype=jnp.bfloat16, **SMALL_SASA,
                              **_QUICK_TO_COMPILE))(
      variables, x, train=False)
  assert bf16.dtype == jnp.float32
  assert np.all(np.isfinite(bf16))
  assert not np.array_equal(bf16, f32)  # The computation did run in bfloat16.
  scale = np.max(np.abs(f32))
  np.testing.assert_allclose(bf16, f32, atol=0.05 * scale)


@pytest.mark.parametrize("name", IMAGENET)
def test_table1_params_and_flops(name):
  paper = models.get_config(name).paper
  ours = models.describe(name)
  full_attention = models.create(name).stem == "attention"
  assert ours["params"] == pytest.approx(paper.params_m * 1e6, rel=0.01)
  assert ours["flops"] == pytest.approx(paper.gflops * 1e9, rel=0.06 if full_attention else
                                        0.03)


@pytest.mark.parametrize("kernel_size, gflops", [(3, 6.6), (5, 6.7), (9, 7.3), (11, 7.7)])
def test_spatial_extent_ablation_flops(kernel_size, gflops):
  """The paper's §4.2 table of k for the conv-stem ResNet-50."""
  ours = models.describe("sasa_resnet50_conv_stem", kernel_size=kernel_size)
  assert ours["flops"] == pytest.approx(gflops * 1e9, rel=0.03)


@pytest.mark.parametrize("name", [n for n in models.list_models() if n.startswith("sasa")])
def test_sasa_models_have_no_spatial_conv_outside_the_stem(name):
  config = models.get_config(name)
  size = min(config.image_size, 32)
  model = models.create(name, **_QUICK_TO_TRACE)
  params = _paths(_param_shapes(model, (1, size, size, config.in_channels)))
  spatial_convs = {path for path, leaf in params.items()
                   if path.endswith("kernel") and leaf.ndim == 4 and leaf.shape[:2] != (1, 1)}
  keeps_conv_stem = model.stem == "conv"
  assert spatial_convs == ({"stem_conv/kernel"} if keeps_conv_stem else set())
  blocks = {path.split("/")[0] for path in params if path.startswith("stage")}
  assert blocks == {path.split("/")[0] for path in params if "/attention/" in path}
  assert any(path.startswith("stem_attention/") for path in params) != keeps_conv_stem


def test_conv_models_have_no_attention():
  params = _paths(_param_shapes(models.create("resnet26_cifar"), (1, 32, 32, 3)))
  assert not any("attention" in path for path in params)
  assert sum(path.endswith("conv2/kernel") for path in params) == 8


def test_overrides_reach_the_layers():
  model = models.create("sasa_resnet26", kernel_size=3, num_heads=4, positional="none",
                        content=False, implementation="reference", dtype=jnp.bfloat16,
                        stem_heads=2, stem_mixtures=1)
  layers = _layers(model, (1, 32, 32, 3), LocalSelfAttention)
  assert len(layers) == 1 + 2 + 4 + 1
  for layer in layers:
    assert (layer.kernel_size, layer.num_heads, layer.positional, layer.content,
            layer.implementation, layer.dtype) == (3, 4, "none", False, "reference",
                                                   jnp.bfloat16)
  (stem,) = _layers(model, (1, 32, 32, 3), AttentionStem)
  assert (stem.num_heads, stem.num_mixtures, stem.dtype) == (2, 1, jnp.bfloat16)
  params = _paths(_param_shapes(model, (1, 32, 32, 3)))
  assert not any(path.endswith(("key/kernel", "rel_h")) and "stage" in path
                 for path in params)


def test_per_stage_spatial_layers():
  """The paper's "conv early, attention late" ablation is one override."""
  model = models.create("sasa_resnet26_conv_stem_cifar",
                        spatial=("conv", "attention", "attention", "attention"))
  params = _paths(_param_shapes(model, (1, 32, 32, 3)))
  assert "stage1_block1/conv2/kernel" in params
  assert "stage2_block1/attention/query/kernel" in params
  assert not any(p.startswith("stage1") and "attention" in p for p in params)


@pytest.mark.parametrize("call, match", [
    (lambda: models.create("resnet51"), r"name 'resnet51'.*valid names.*sasa_resnet50"),
    (lambda: models.describe("sasa_resnet"), r"valid names"),
    (lambda: models.create("sasa_resnet26", kernel=3), r"\['kernel'\].*kernel_size"),
    (lambda: models.create("sasa_resnet26", positional="learned"),
     r"positional.*'relative', 'absolute', 'none'"),
    (lambda: models.create("sasa_resnet26", implementation="fast"),
     r"implementation.*'reference'"),
    (lambda: models.create("sasa_resnet26", kernel_size=4), r"kernel_size.*odd"),
    (lambda: models.create("sasa_resnet26", num_heads=5), r"num_heads"),
    (lambda: models.create("sasa_resnet26", spatial="sasa"), r"spatial.*'conv', 'attention'"),
    (lambda: models.create("sasa_resnet26", spatial=("conv", "attention")), r"4 stages"),
    (lambda: models.create("resnet26", stage_sizes=4), r"stage_sizes"),
    (lambda: models.create("sasa_resnet26", stem="patchify"), r"stem.*'conv', 'attention'"),
    (lambda: models.create("sasa_resnet26", stem_heads=3), r"num_heads"),
])
def test_invalid_configs_raise_before_tracing(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_flop_counter_formulas():
  """Each layer type against its formula (MACs per output pixel, x2)."""
  x = (1, 8, 8, 6)
  conv = nn.Conv(4, (3, 3), strides=2)
  assert flops.count(conv, x)["flops"] == 2 * (4 * 4) * (3 * 3 * 6 * 4)
  grouped = nn.Conv(4, (3, 3), feature_group_count=2)
  assert flops.count(grouped, x)["flops"] == 2 * 64 * (3 * 3 * 3 * 4)
  dense = nn.Dense(5)
  assert flops.count(dense, x)["flops"] == 2 * 64 * 6 * 5
  # Strided attention counts at the input resolution; projections q, k, v + 3 terms.
  sasa = LocalSelfAttention(16, num_heads=4, kernel_size=5, stride=2)
  assert flops.count(sasa, x)["flops"] == 2 * 64 * 16 * (3 * 6 + 3 * 25)
  # Without the content term: no key projection and no q.k; global: k^2 = H * W.
  no_content = LocalSelfAttention(16, num_heads=4, kernel_size=None, content=False)
  assert flops.count(no_content, x)["flops"] == 2 * 64 * 16 * (2 * 6 + 2 * 64)
  stem = AttentionStem(16, num_heads=4, block_size=4, num_mixtures=3)
  assert flops.count(stem, x)["flops"] == 2 * 64 * 16 * ((2 + 3) * 6 + 2 * 16)


def test_table_lists_every_model_beside_the_paper():
  lines = table().splitlines()
  assert len(lines) == 2 + len(models.list_models())
  row = next(line for line in lines if line.startswith("| sasa_resnet50_conv_stem |"))
  assert "18.02M" in row and "6.97G" in row and "18.0M" in row and "7.0G" in row


def test_describe_arguments():
  default = models.describe("resnet26")
  assert models.describe("resnet26", image_size=224, num_classes=1000) == default
  ten_classes = models.describe("resnet26", num_classes=10)
  head = 2048 + 1  # weights and bias per class
  assert default["params"] - ten_classes["params"] == 990 * head
  assert default["flops"] - ten_classes["flops"] == 2 * 990 * 2048
  assert models.describe("resnet26", image_size=448)["flops"] > 3.9 * default["flops"]
  assert (models.describe("sasa_resnet26_conv_stem", kernel_size=9)["flops"] >
          models.describe("sasa_resnet26_conv_stem")["flops"])


def test_fashion_mnist_models_share_one_shape():
  """The three Fashion-MNIST models differ only in the spatial layers and the stem, which
  both end 2x2-pooled at 14x14; every attention layer runs on a 14x14 map, so k = 9
  windows fit."""
  shape = (1, 28, 28, 1)
  conv, conv_stem, full = (models.create(name) for name in
                           ("resnet_fmnist", "sasa_fmnist_conv_stem", "sasa_fmnist"))
  assert (conv.stem, conv_stem.stem, full.stem) == ("conv", "conv", "attention")
  assert (full.stem_block_size, full.stem_pool) == (2, 2)
  others = [{f: getattr(m, f) for f in models.OVERRIDES if f not in ("spatial", "stem")}
            for m in (conv, conv_stem, full)]
  assert others[0] == others[1] == others[2]
  for model in (conv_stem, full):
    attention = _calls(model, shape, lambda m: isinstance(m, LocalSelfAttention))
    assert attention and all(s[1:3] == (14, 14) for _, s in attention)
    stem = _calls(model, shape, lambda m: isinstance(m, AttentionStem))
    assert [s for _, s in stem] == ([shape] if model is full else [])
  counts = {name: models.describe(name) for name in
            ("resnet_fmnist", "sasa_fmnist_conv_stem", "sasa_fmnist")}
  # Attention has fewer parameters than the convolutions it replaces (Table 1's trend).
  assert counts["sasa_fmnist"]["params"] < counts["resnet_fmnist"]["params"]
  assert counts["sasa_fmnist_conv_stem"]["params"] < counts["resnet_fmnist"]["params"]


def test_stem_pool_needs_small_inputs():
  with pytest.raises(ValueError, match="stem_pool must be a positive int"):
    models.create("resnet_fmnist", stem_pool=0)
  with pytest.raises(ValueError, match="small-input stems only"):
    models.create("resnet26", stem_pool=2)
  # Pooling by 2 after a stride-1 3x3 conv stem halves the map.
  for pool, size in ((1, 28), (2, 14)):
    model = models.create("resnet_fmnist", stem_pool=pool)
    (block,) = _calls(model, (1, 28, 28, 1), lambda m: m.name == "stage1_block1")
    assert block[1] == (1, size, size, 16)


def test_tiny_model_is_small():
  assert 20_000 <= models.describe("sasa_tiny")["params"] <= 60_000


@pytest.mark.parametrize("name", ["sasa_tiny", "resnet_tiny"])
def test_sgd_lowers_the_loss_on_a_fixed_batch(name):
  model = models.create(name, **_QUICK_TO_COMPILE)
  x = _images((16, 8, 8, 1))
  labels = jnp.arange(16) % 10
  variables = _init(model, x, seed=1)
  tx = optax.sgd(0.1, momentum=0.9)

  def loss_fn(params, batch_stats):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                  train=True, mutable=["batch_stats"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, updates["batch_stats"]

  @jax.jit
  def step(params, batch_stats, opt_state):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params,
                                                                            batch_stats)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  params, batch_stats = variables["params"], variables["batch_stats"]
  opt_state = tx.init(params)
  losses = []
  for _ in range(10):
    params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
    losses.append(float(loss))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.75 * losses[0]
  # Every parameter trains, the attention layers' included (the zero-initialised last
  # BatchNorm of each block lets their gradients through after the first step).
  before, after = _paths(variables["params"]), _paths(params)
  assert [k for k in before if np.array_equal(before[k], after[k])] == []
