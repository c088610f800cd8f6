"""Every config in configs/ is complete, valid, names a registered model, and the
ImageNet one carries the paper's recipe."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import cifar10, default, fashion_mnist, imagenet
from sasa_jax import models, training
from sasa_jax.config import keys
from sasa_jax.config import checks as config_validation
from sasa_jax.training import run_plan

ALL = ([("default", None)] + [("cifar10", m) for m in cifar10.MODELS] +
       [("imagenet", m) for m in imagenet.MODELS] +
       [("fashion_mnist", m) for m in fashion_mnist.MODELS])
_MODULES = {"default": default, "cifar10": cifar10, "imagenet": imagenet,
            "fashion_mnist": fashion_mnist}


@pytest.mark.parametrize("name,model", ALL)
def test_config_is_valid_and_names_a_registered_model(name, model):
  module = _MODULES[name]
  config = module.get_config() if model is None else module.get_config(model)
  config_validation.validate_config(config)
  assert config.model in models.list_models()
  if model is not None:
    assert config.model == model


def test_paper_table1_models_all_have_an_imagenet_config():
  assert set(imagenet.MODELS) == {
      f"{prefix}{depth}{suffix}" for depth in (26, 38, 50)
      for prefix, suffix in (("resnet", ""), ("sasa_resnet", "_conv_stem"),
                             ("sasa_resnet", ""))}
  assert {"sasa_resnet26_cifar", "resnet26_cifar"} <= set(cifar10.MODELS)


IMAGENET_TRAIN_EXAMPLES = 1_281_167


def test_imagenet_recipe():
  c = imagenet.get_config()
  plan = run_plan.create_run_plan(c, IMAGENET_TRAIN_EXAMPLES)
  assert (c.dataset, c.batch_size, c.num_epochs, c.warmup_epochs) == (
      "imagenet2012", 4096, 130, 10)
  assert plan.learning_rate == pytest.approx(1.6)  # Paper, at batch 4096.
  assert plan.num_train_steps == 40_662 and plan.warmup_steps == 3_128
  assert c.lr_schedule == "cosine"
  assert (c.optimizer, c.nesterov, c.ema_decay, c.ema_warmup) == ("sgd", True, 0.9999,
                                                                   False)
  # Unstated in the paper; the common ResNet values.
  assert (c.label_smoothing, c.weight_decay, c.image_size) == (0.1, 1e-4, 224)
  assert (c.augmentation, c.eval_preprocessing) == ("inception", "center_crop")


@pytest.mark.parametrize("module,num_train_examples", [
    (imagenet, IMAGENET_TRAIN_EXAMPLES), (cifar10, 50_000), (default, 1437),
    (fashion_mnist, 60_000)])
def test_a_batch_override_keeps_the_recipe(module, num_train_examples):
  """The same config at two batch sizes: the same epochs, warm-up epochs and intervals
  in epochs, and the peak learning rate scaled linearly with the batch."""
  config = module.get_config()
  plans = {}
  for batch_size in (config.batch_size, config.batch_size // 4):
    config.batch_size = batch_size
    plans[batch_size] = run_plan.create_run_plan(config, num_train_examples)
  big, small = plans.values()
  for steps in ("num_train_steps", "warmup_steps", "eval_every_steps",
                "checkpoint_every_steps"):
    assert small.epochs(getattr(small, steps)) == pytest.approx(
        big.epochs(getattr(big, steps)), rel=0.02, abs=2 / small.steps_per_epoch), steps
  assert small.epochs(small.num_train_steps) == pytest.approx(config.num_epochs, rel=1e-3)
  assert small.learning_rate == pytest.approx(big.learning_rate / 4)


def test_the_paper_ema_decay_holds_over_the_whole_imagenet_run():
  """The paper's constant 0.9999 at every step; the optional TF-style warm-up would
  still be below it at the run's last step."""
  c = imagenet.get_config()
  last = run_plan.create_run_plan(c, IMAGENET_TRAIN_EXAMPLES).num_train_steps
  steps = jnp.array([0, 1, 1000, last // 2, last - 1])
  decay = training.ema_decay_at(steps, c.ema_decay, c.ema_warmup)
  np.testing.assert_allclose(decay, 0.9999, rtol=1e-7)
  warm = training.ema_decay_at(jnp.array(last - 1), c.ema_decay, warmup=True)
  assert float(warm) < 0.9998


def test_default_config_is_the_digits_run():
  c = default.get_config()
  assert (c.dataset, c.model, c.image_size) == ("digits", "sasa_tiny", 8)


def test_unknown_config_argument_is_a_clear_error():
  with pytest.raises(ValueError, match="model must be one of"):
    imagenet.get_config("resnet101")
  with pytest.raises(AttributeError, match="weight_decay_on_bn"):
    default.get_config().weight_decay_on_bn = True


# A command-line value of each type, and what it parses to.
_SAMPLE_VALUES = {str: ("abc", "abc"), int: ("7", 7), float: ("0.25", 0.25),
                  bool: ("false", False), tuple: ("(2,3)", (2, 3)),
                  object: ("(3,5)", (3, 5))}


def _leaf_types(config, prefix=""):
  """``{'a.b': type}`` of every leaf key (placeholders included)."""
  out = {}
  for key in config.keys():
    if isinstance(config[key], ml_collections.ConfigDict):
      out.update(_leaf_types(config[key], f"{prefix}{key}."))
    else:
      out[prefix + key] = config.get_ref(key).get_type()
  return out


def test_every_config_key_can_be_overridden_on_the_command_line():
  """One ``--config.<key>=<value>`` per key (``data_dir`` and the other None-default
  placeholders included) parses into the config, as train.py's flag does."""
  types = _leaf_types(default.get_config())
  assert {"data_dir", "num_train_steps", "model_overrides.kernel_size"} <= set(types)
  argv = ["train.py"] + [f"--config.{key}={_SAMPLE_VALUES[t][0]}"
                         for key, t in types.items()]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", default.__file__, flag_values=flag_values,
                                  sys_argv=argv)
  flag_values(argv)
  config = flag_values.config
  for key, t in types.items():
    value = functools.reduce(getattr, key.split("."), config)
    assert value == _SAMPLE_VALUES[t][1], key


def test_model_overrides_hold_every_resnet_field():
  """Each ``ResNet`` field is one ``--config.model_overrides.<field>`` (dtypes come from
  ``compute_dtype``)."""
  assert set(keys.model_overrides()) == set(models.OVERRIDES) - {"dtype", "param_dtype"}


def test_fashion_mnist_recipe():
  """The paper's recipe scaled down: Nesterov SGD, warm-up then cosine, label smoothing,
  weight decay (off BatchNorm/bias), random flips; the three 28x28 models."""
  c = fashion_mnist.get_config()
  assert (c.dataset, c.model, c.image_size, c.augmentation) == (
      "fashion_mnist", "sasa_fmnist", 28, "flip")
  assert (c.optimizer, c.nesterov, c.lr_schedule) == ("sgd", True, "cosine")
  assert c.warmup_epochs > 0 and c.label_smoothing == 0.1 and c.weight_decay > 0
  for name in fashion_mnist.MODELS:
    config = models.get_config(name)
    assert (config.image_size, config.in_channels, config.num_classes) == (28, 1, 10)
