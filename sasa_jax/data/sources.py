"""Datasets as random-access sources of examples, opened once per run.

A source has ``__len__`` and ``__getitem__`` returning ``{'image': uint8 (H, W, C),
'label': int}``. :func:`open_dataset` opens ``config.dataset``:

* ``'digits'``: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits that
  ship inside the wheel), split once, deterministically, 80/20 into ``'train'`` and
  ``'test'``. Runs with no network.
* any other name: a TFDS dataset in ``config.data_dir`` (``None``: TFDS's default,
  ``~/tensorflow_datasets``), read with ``builder.as_data_source`` (ArrayRecord files, no
  TensorFlow needed to read). A dataset that is not prepared is prepared first when
  ``config.data_download`` (:mod:`sasa_jax.data.tfds_preparation`).

The TFDS builder is created once, when the dataset is opened; its splits' sources and the
:class:`DatasetInfo` come from it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from sasa_jax.data import tfds_preparation
from sasa_jax.errors import ConfigError, DataError

DIGITS = tfds_preparation.DIGITS
DIGITS_SPLITS = ("train", "test")

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the program needs to know about a dataset and its two splits.
  ``image_size``: ``(H, W)`` of every image, or None where they differ (e.g. ImageNet)."""

  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  num_channels: int
  image_size: tuple[int, int] | None = None


class DigitsSource:
  """scikit-learn's 8x8 digits as a random-access source of uint8 images.

  Pixel values 0..16 are scaled by 15 to 0..240 (exact, no rounding). The split is
  a fixed permutation (seed 0): the first 360 examples (20%) are ``'test'``.
  """

  NUM_TEST = 360
  NUM_CLASSES = 10
  IMAGE_SHAPE = (8, 8, 1)

  def __init__(self, split: str):
    if split not in DIGITS_SPLITS:
      raise ConfigError(
          f"dataset='digits' has splits {list(DIGITS_SPLITS)}; got split={split!r}.")
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    idx = order[:self.NUM_TEST] if split == "test" else order[self.NUM_TEST:]
    self._images = images[idx]
    self._labels = labels[idx]

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> Example:
    return {"image": self._images[index], "label": self._labels[index]}

  def __repr__(self) -> str:
    return f"DigitsSource(num_examples={len(self)})"


class TfdsSource:
  """A split of a prepared TFDS dataset (its ArrayRecord source), whose read failures
  name the dataset, the split, the file and the example, and say how to re-prepare."""

  def __init__(self, builder, name: str, split: str):
    self._source = builder.as_data_source(split=split)
    self._builder = builder
    self._name = name
    self._split = split
    # Example i of the split is in the first file whose examples end after it.
    self._files = [(i.filename, i.take) for i in builder.info.splits[split].file_instructions]

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> Example:
    try:
      return self._source[index]
    except Exception as e:  # pylint: disable=broad-except  # The library's read failed.
      raise DataError(
          f"Reading example {index} of dataset {self._name!r}, split {self._split!r}, from "
          f"{self._file_of(index)} failed ({type(e).__name__}: {e}). The file is damaged or "
          f"was changed after the dataset was prepared: delete {self._builder.data_dir} "
          f"and prepare the dataset again.\n"
          f"{tfds_preparation.how_to_prepare(self._name, self._builder)}") from e

  def _file_of(self, index: int) -> str:
    for filename, take in self._files:
      if index < take:
        return filename
      index -= take
    return "one of its files"

  def __repr__(self) -> str:
    return f"TfdsSource({self._name!r}, split={self._split!r}, num_examples={len(self)})"


class Dataset:
  """``config.dataset`` opened once: ``source(split)`` and ``info`` (of the config's train
  and eval splits, both checked to exist and to be non-empty)."""

  def __init__(self, config):
    self.name = config.dataset
    self._builder = None
    if self.name != DIGITS:
      self._builder = tfds_preparation.tfds_builder(self.name, config.data_dir,
                                                    prepare=config.data_download)
    self._sources: dict[str, Any] = {}
    train, evals = self.source(config.train_split), self.source(config.eval_split)
    if len(train) == 0 or len(evals) == 0:
      raise ConfigError(
          f"dataset={self.name!r}: split {config.train_split!r} has {len(train)} examples "
          f"and {config.eval_split!r} has {len(evals)}; both must be non-empty.")
    num_classes, (height, width, channels) = self._classes_and_image_shape()
    self.info = DatasetInfo(name=self.name, num_classes=num_classes,
                            num_train_examples=len(train), num_eval_examples=len(evals),
                            num_channels=channels,
                            image_size=None if None in (height, width) else (height, width))

  def source(self, split: str):
    """The random-access source of ``split`` (slices such as ``train[:90%]`` work)."""
    if split not in self._sources:
      self._sources[split] = self._open(split)
    return self._sources[split]

  def _open(self, split: str):
    if self._builder is None:
      return DigitsSource(split)
    splits = self._builder.info.splits
    if split.split("[")[0] not in splits:
      raise ConfigError(f"dataset={self.name!r} has splits {sorted(splits)}; got {split!r}.")
    return TfdsSource(self._builder, self.name, split)

  def _classes_and_image_shape(self) -> tuple[int, tuple[int | None, int | None, int]]:
    """The number of classes and the images' ``(H, W, C)`` (None where sizes differ)."""
    if self._builder is None:
      return DigitsSource.NUM_CLASSES, DigitsSource.IMAGE_SHAPE
    features = self._builder.info.features
    for key in ("image", "label"):
      if key not in features:
        raise ConfigError(f"dataset={self.name!r} has features {sorted(features)}; image "
                          f"classification needs 'image' and 'label'.")
    height, width, channels = features["image"].shape
    return int(features["label"].num_classes), (height, width, channels or 3)


def open_dataset(config) -> Dataset:
  """``config.dataset`` with its splits checked (see :class:`Dataset`)."""
  return Dataset(config)
