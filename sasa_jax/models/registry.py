"""Named model configurations, in the spirit of timm: ``create``, ``list_models``,
``describe``.

Every name is a ``ResNet`` configuration; keyword overrides replace any of its fields, so
each of the paper's ablations (§4.2) is one line::

    create('sasa_resnet50_conv_stem', kernel_size=3)           # spatial extent k
    create('sasa_resnet50_conv_stem', positional='none')       # positional encoding
    create('sasa_resnet50_conv_stem', content=False)           # q.r only
    create('sasa_resnet50', stem_mixtures=1)                   # plain attention stem
    create('sasa_resnet50_conv_stem',
           spatial=('conv', 'attention', 'attention', 'attention'))  # conv early
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from sasa_jax.models import flops
from sasa_jax.models.resnet import ResNet


@dataclasses.dataclass(frozen=True)
class PaperResult:
  """A row of the paper's Table 1 (ImageNet, 224x224)."""

  gflops: float
  params_m: float
  top1: float


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A registered model: ``ResNet`` fields and the input it is made for."""

  fields: Mapping[str, Any]
  image_size: int
  in_channels: int
  num_classes: int
  paper: PaperResult | None = None


_STAGE_SIZES = {26: (1, 2, 4, 1), 38: (2, 3, 5, 2), 50: (3, 4, 6, 3)}

# Name pattern -> (ResNet fields, Table 1 results per depth).
_VARIANTS = {
    "resnet{}": (dict(spatial="conv", stem="conv"), {
        26: PaperResult(4.7, 13.7, 74.5),
        38: PaperResult(6.5, 19.6, 76.2),
        50: PaperResult(8.2, 25.6, 76.9),
    }),
    "sasa_resnet{}_conv_stem": (dict(spatial="attention", stem="conv"), {
        26: PaperResult(4.5, 10.3, 75.8),
        38: PaperResult(5.7, 14.1, 77.1),
        50: PaperResult(7.0, 18.0, 77.4),
    }),
    "sasa_resnet{}": (dict(spatial="attention", stem="attention"), {
        26: PaperResult(4.7, 10.3, 74.8),
        38: PaperResult(6.0, 14.1, 76.9),
        50: PaperResult(7.2, 18.0, 77.6),
    }),
}

# Small enough to train on 8x8 grayscale digits (sklearn's load_digits) in about a minute
# on two CPU cores: two stages (8x8, 4x4), width 16, 5x5 windows, 4 heads of depth 4/8.
_TINY = dict(stage_sizes=(1, 1), width=16, small_inputs=True, kernel_size=5, num_heads=4)

# Fashion-MNIST (28x28 grayscale): the stem (3x3 conv, or attention within 2x2 blocks)
# ends with 2x2 max-pooling (28 -> 14); two stages, 14x14 then 7x7, width 16, 4 heads.
# Every attention layer runs on a 14x14 map (stage 2's single block attends at its input
# resolution, then pools), so windows up to k = 13 stay inside one map.
_FMNIST = dict(stage_sizes=(2, 1), width=16, small_inputs=True, stem_pool=2,
               stem_block_size=2, kernel_size=7, num_heads=4)
_FMNIST_NAMES = {"resnet{}": "resnet_fmnist", "sasa_resnet{}_conv_stem": "sasa_fmnist_conv_stem",
                 "sasa_resnet{}": "sasa_fmnist"}


def _build_registry() -> dict[str, ModelConfig]:
  imagenet = {
      pattern.format(depth): ModelConfig(dict(variant, stage_sizes=stage_sizes), 224, 3,
                                         1000, paper[depth])
      for depth, stage_sizes in _STAGE_SIZES.items()
      for pattern, (variant, paper) in _VARIANTS.items()
  }
  cifar = {
      f"{name}_cifar": ModelConfig(dict(config.fields, small_inputs=True), 32, 3, 10)
      for name, config in imagenet.items()
  }
  tiny = {
      "resnet_tiny": ModelConfig(dict(_TINY, spatial="conv"), 8, 1, 10),
      "sasa_tiny": ModelConfig(dict(_TINY, spatial="attention"), 8, 1, 10),
  }
  fmnist = {
      name: ModelConfig(dict(_FMNIST, **_VARIANTS[pattern][0]), 28, 1, 10)
      for pattern, name in _FMNIST_NAMES.items()
  }
  return {**imagenet, **cifar, **tiny, **fmnist}


MODELS: Mapping[str, ModelConfig] = _build_registry()

# Overridable ResNet fields (``num_classes`` is create's own argument).
OVERRIDES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ResNet)
    if f.init and f.name not in ("parent", "name", "num_classes"))


def list_models() -> list[str]:
  """The registered model names."""
  return list(MODELS)


def get_config(name: str) -> ModelConfig:
  """The registered ``ModelConfig`` of ``name``; ValueError listing the names otherwise."""
  if name not in MODELS:
    raise ValueError(f"Unknown model name {name!r}; valid names: {list_models()}.")
  return MODELS[name]


def create(name: str, num_classes: int | None = None, **overrides) -> ResNet:
  """The ``ResNet`` registered as ``name`` (an unbound linen module).

  Args:
    name: one of ``list_models()``.
    num_classes: classifier outputs; ``None``: the model's data set's (1000 for the
      ImageNet models, 10 for ``*_cifar`` and the tiny models).
    **overrides: ``ResNet`` fields (``OVERRIDES``) replacing the registered ones, e.g.
      ``kernel_size=3``, ``num_heads=4``, ``positional='none'``, ``content=False``,
      ``implementation='blocked'``, ``dtype=jnp.bfloat16``.

  Raises:
    ValueError: for an unknown name or override, or an invalid value (e.g. ``num_heads``
      not dividing the widths), with the valid choices, before anything is traced.
  """
  config = get_config(name)
  unknown = sorted(set(overrides) - set(OVERRIDES))
  if unknown:
    raise ValueError(f"Unknown override(s) {unknown} for model {name!r}; valid overrides: "
                     f"{list(OVERRIDES)}.")
  if num_classes is None:
    num_classes = config.num_classes
  return ResNet(**{**config.fields, **overrides}, num_classes=num_classes)


def describe(name: str, image_size: int | None = None, num_classes: int | None = None,
             **overrides) -> dict[str, int]:
  """``{'params': int, 'flops': int}`` of a model on one ``image_size`` square image.

  FLOPs are 2 x multiply-adds counted analytically (``sasa_jax.models.flops``), the
  convention of the paper's Table 1. Uses shapes only: fast even for ResNet-50 at 224.
  ``image_size`` and ``num_classes`` default to the model's data set's (224 and 1000 for
  the ImageNet models); ``overrides`` as in ``create``.
  """
  config = get_config(name)
  model = create(name, num_classes, **overrides)
  size = image_size or config.image_size
  return flops.count(model, (1, size, size, config.in_channels), train=False)
