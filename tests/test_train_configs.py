"""Every config in configs/ is complete, valid, names a registered model, and the
ImageNet one carries the paper's recipe."""

from __future__ import annotations

import pytest
from configs import cifar10, default, imagenet

from sasa_jax import config_validation
from sasa_jax import models
from sasa_jax.errors import ConfigError

ALL = ([("default", None)] + [("cifar10", m) for m in cifar10.MODELS] +
       [("imagenet", m) for m in imagenet.MODELS])
_MODULES = {"default": default, "cifar10": cifar10, "imagenet": imagenet}


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


def test_imagenet_recipe():
  c = imagenet.get_config()
  steps_per_epoch = 1_281_167 // 4096
  assert (c.dataset, c.batch_size, c.learning_rate) == ("imagenet2012", 4096, 1.6)
  assert c.num_train_steps == 130 * steps_per_epoch
  assert c.warmup_steps == 10 * steps_per_epoch and c.lr_schedule == "cosine"
  assert (c.optimizer, c.nesterov, c.ema_decay) == ("sgd", True, 0.9999)
  # Unstated in the paper; the common ResNet values.
  assert (c.label_smoothing, c.weight_decay, c.image_size) == (0.1, 1e-4, 224)
  assert (c.augmentation, c.eval_preprocessing) == ("inception", "center_crop")
  source = open(imagenet.__file__).read()
  for value in ("label_smoothing = 0.1  # Unstated", "weight_decay = 1e-4  # Unstated",
                "image_size = 224  # Unstated"):
    assert value in source


def test_default_config_is_the_digits_run():
  c = default.get_config()
  assert (c.dataset, c.model, c.image_size) == ("digits", "sasa_tiny", 8)


def test_unknown_config_argument_is_a_clear_error():
  with pytest.raises(ValueError, match="model must be one of"):
    imagenet.get_config("resnet101")
  config = default.get_config()
  config.weight_decay_on_bn = True
  with pytest.raises(ConfigError, match="unknown config key 'weight_decay_on_bn'"):
    config_validation.validate_config(config)
