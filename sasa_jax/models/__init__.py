"""SASA and convolutional ResNets (paper §4.1) and their registry.

    model = models.create('sasa_resnet26_conv_stem', num_classes=1000, kernel_size=5)
    variables = model.init(rng, images, train=False)   # images: (B, H, W, C) float
    logits = model.apply(variables, images, train=False)

``list_models()`` names the models; ``describe(name)`` gives their parameter and FLOP
counts; ``python -m sasa_jax.models`` prints them beside the paper's Table 1.
"""

from sasa_jax.models.registry import (MODELS, OVERRIDES, ModelConfig, PaperResult, create,
                                      describe, get_config, list_models)
from sasa_jax.models.resnet import SPATIAL_LAYERS, STEMS, BottleneckBlock, ResNet

__all__ = [
    "MODELS", "OVERRIDES", "SPATIAL_LAYERS", "STEMS", "BottleneckBlock", "ModelConfig",
    "PaperResult", "ResNet", "create", "describe", "get_config", "list_models"
]
