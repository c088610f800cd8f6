"""Per-example preprocessing on the host (numpy; uint8 in, uint8 out), and the
normalisation that follows on the device.

Training augmentations (``config.augmentation``): ``'none'``; ``'flip'``, a random
horizontal flip (for centred, size-normalised images such as Fashion-MNIST's);
``'cifar'``, zero-pad 4, random crop back to the size, random horizontal flip;
``'inception'``, a random-resized crop (Szegedy et al. 2015) and flip. Evaluation
(``config.eval_preprocessing``): ``'none'``, or ``'center_crop'``, a central crop
resized to ``config.image_size``.
:class:`TrainPreprocess` and :class:`EvalPreprocess` are the picklable grain maps that
apply them; every example is then checked against what the model takes
(:class:`ExampleSpec`). Images stay ``uint8`` until they reach the device, where
:func:`normalize_images` runs inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from sasa_jax.data.sources import Example
from sasa_jax.errors import DataError


def _resize(image: np.ndarray, size: int) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  from PIL import Image  # pylint: disable=g-import-not-at-top

  squeeze = image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  out = np.asarray(pil.resize((size, size), Image.BICUBIC))
  return out[..., None] if squeeze else out


def _flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.random() < 0.5 else image


def pad_crop_flip(image: np.ndarray, rng: np.random.Generator, size: int,
                  pad: int = 4) -> np.ndarray:
  """CIFAR augmentation: zero-pad by ``pad``, random ``size`` crop, random flip."""
  padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  top, left = rng.integers(0, 2 * pad + 1, size=2)
  return _flip(padded[top : top + size, left : left + size], rng)


def inception_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                   area_range: tuple[float, float] = (0.08, 1.0),
                   aspect_range: tuple[float, float] = (3 / 4, 4 / 3),
                   attempts: int = 10) -> np.ndarray:
  """Inception-style random-resized crop (Szegedy et al. 2015) + random flip."""
  h, w = image.shape[:2]
  for _ in range(attempts):
    area = h * w * rng.uniform(*area_range)
    aspect = math.exp(rng.uniform(math.log(aspect_range[0]),
                                  math.log(aspect_range[1])))
    ch = int(round(math.sqrt(area / aspect)))
    cw = int(round(math.sqrt(area * aspect)))
    if 0 < ch <= h and 0 < cw <= w:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      crop = image[top : top + ch, left : left + cw]
      break
  else:  # Fall back to a central crop, as the reference implementation does.
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = image[top : top + side, left : left + side]
  return _flip(_resize(np.ascontiguousarray(crop), size), rng)


def center_crop(image: np.ndarray, size: int, crop_fraction: float) -> np.ndarray:
  """Central square of ``crop_fraction`` of the shorter side, resized to ``size``.

  With ``crop_fraction = 0.875`` and ``size = 224`` this is the usual ImageNet
  evaluation (resize to 256, center crop 224).
  """
  h, w = image.shape[:2]
  side = max(1, int(round(min(h, w) * crop_fraction)))
  top, left = (h - side) // 2, (w - side) // 2
  return _resize(np.ascontiguousarray(image[top : top + side, left : left + side]),
                 size)


def as_example(example: Mapping[str, Any]) -> Example:
  """A source's example as ``{'image': uint8 (H, W, C), 'label': int32}``; a
  ``DataError`` if it is not an image and a class index."""
  image = np.asarray(example["image"])
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.dtype != np.uint8 or 0 in image.shape:
    raise DataError(
        f"An example's image has shape {image.shape} and dtype {image.dtype}; "
        f"expected a non-empty uint8 (H, W) or (H, W, C) image.")
  label = np.asarray(example["label"])
  if label.shape != () or not np.issubdtype(label.dtype, np.integer):
    raise DataError(f"An example's label {label!r} is not an integer class index.")
  return {"image": image, "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What the model takes: checked on every example after preprocessing."""

  image_size: int
  num_channels: int | None = None
  num_classes: int | None = None

  def check(self, ex: Example, preprocessing: str) -> Example:
    image, label = ex["image"], int(ex["label"])
    channels = self.num_channels or image.shape[-1]
    want = (self.image_size, self.image_size, channels)
    if image.shape != want:
      raise DataError(
          f"After preprocessing {preprocessing!r} an example's image has shape "
          f"{image.shape}, but the model takes {want} (config.image_size="
          f"{self.image_size}, {channels} channel(s)). Choose a preprocessing that "
          f"resizes (augmentation='inception', eval_preprocessing='center_crop') "
          f"or set config.image_size to the images' size.")
    if self.num_classes is not None and not 0 <= label < self.num_classes:
      raise DataError(f"An example's label {label} is out of range: the dataset "
                      f"has {self.num_classes} classes (0..{self.num_classes - 1}).")
    return ex


@dataclasses.dataclass(frozen=True)
class TrainPreprocess:
  """Picklable grain random map: the dataset's standard training augmentation.

  'none', 'flip' and 'cifar' keep the image size (it must be ``image_size``);
  'inception' crops and resizes any image.
  """

  augmentation: str
  spec: ExampleSpec

  def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> Example:
    ex = as_example(example)
    size = self.spec.image_size
    if self.augmentation == "cifar" and ex["image"].shape[:2] == (size, size):
      ex["image"] = pad_crop_flip(ex["image"], rng, size)
    elif self.augmentation == "flip":
      ex["image"] = _flip(ex["image"], rng)
    elif self.augmentation == "inception":
      ex["image"] = inception_crop(ex["image"], rng, size)
    return self.spec.check(ex, self.augmentation)


@dataclasses.dataclass(frozen=True)
class EvalPreprocess:
  """Picklable grain map: deterministic evaluation preprocessing ('none' keeps the
  image as it is: it must be ``image_size``; 'center_crop' crops and resizes)."""

  preprocessing: str
  spec: ExampleSpec
  crop_fraction: float

  def __call__(self, example: Mapping[str, Any]) -> Example:
    ex = as_example(example)
    if self.preprocessing == "center_crop":
      ex["image"] = center_crop(ex["image"], self.spec.image_size, self.crop_fraction)
    return self.spec.check(ex, self.preprocessing)


def normalize_images(images: jnp.ndarray, mean: Sequence[float],
                     std: Sequence[float]) -> jnp.ndarray:
  """uint8 ``(B, H, W, C)`` -> float32 ``(x / 255 - mean) / std`` (on device)."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
