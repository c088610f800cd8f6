"""Datasets: random-access sources of examples, and the TFDS builder behind them.

A source has ``__len__`` and ``__getitem__`` returning ``{'image': uint8 (H, W, C),
'label': int}``. Two kinds:

* ``dataset='digits'``: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten
  digits that ship inside the wheel), split once, deterministically, 80/20 into
  ``'train'`` and ``'test'``. Runs with no network.
* any other name: a TFDS dataset read with ``tfds.data_source`` (ArrayRecord files,
  no TensorFlow needed to read). If it is not prepared, TFDS is asked to download
  and prepare it; if that fails, :class:`DatasetNotPreparedError` says how to prepare
  it offline.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import numpy as np

from sasa_jax.errors import ConfigError, DatasetNotPreparedError

DIGITS = "digits"
DIGITS_SPLITS = ("train", "test")

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the program needs to know about a dataset split pair."""

  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  num_channels: int


class DigitsSource:
  """scikit-learn's 8x8 digits as a random-access source of uint8 images.

  Pixel values 0..16 are scaled by 15 to 0..240 (exact, no rounding). The split is
  a fixed permutation (seed 0): the first 360 examples (20%) are ``'test'``.
  """

  NUM_TEST = 360

  def __init__(self, split: str):
    if split not in DIGITS_SPLITS:
      raise ConfigError(
          f"dataset='digits' has splits {list(DIGITS_SPLITS)}; got split={split!r}."
      )
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    images = (digits.images * 15).astype(np.uint8)[..., None]  # (N, 8, 8, 1)
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(labels))
    idx = order[: self.NUM_TEST] if split == "test" else order[self.NUM_TEST :]
    self._images = images[idx]
    self._labels = labels[idx]
    self.num_classes = 10

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> Example:
    return {"image": self._images[index], "label": self._labels[index]}

  def __repr__(self) -> str:
    return f"DigitsSource(num_examples={len(self)})"


def _prepare_instructions(name: str, data_dir: str | None) -> str:
  where = data_dir or "~/tensorflow_datasets"
  return (
      f"To prepare it offline: on a machine with network access run\n"
      f"    pip install -e '.[data]'\n"
      f"    tfds build {name} --data_dir=DIR --file_format=array_record\n"
      f"then copy DIR to this machine and pass --config.data_dir=DIR "
      f"(now: {where}). Datasets that need a manual download (e.g. imagenet2012) "
      f"read their archives from DIR/downloads/manual: download them from the "
      f"dataset's website (see https://www.tensorflow.org/datasets/catalog/{name}), "
      f"put them there and run the same `tfds build` command (it then needs no "
      f"network). Reading needs the ArrayRecord file format."
  )


def _tfds_builder(name: str, data_dir: str | None, download: bool):
  """Returns a prepared TFDS builder, preparing it if allowed; clear errors if not."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    close = difflib.get_close_matches(name, [DIGITS, *tfds.list_builders()], n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"Unknown config.dataset={name!r}: it is neither {DIGITS!r} (the embedded "
        f"scikit-learn digits) nor a TFDS dataset (registered, or prepared in "
        f"data_dir={data_dir!r}).{hint}"
    ) from e
  if not builder.is_prepared():
    if not download:
      raise DatasetNotPreparedError(
          f"Dataset {name!r} is not prepared in data_dir={data_dir!r}.\n"
          + _prepare_instructions(name, data_dir)
      )
    try:
      builder.download_and_prepare(
          file_format="array_record",
          download_config=tfds.download.DownloadConfig(try_download_gcs=False),
      )
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetNotPreparedError(
          f"Dataset {name!r} is not prepared in data_dir={data_dir!r} and could "
          f"not be downloaded and prepared ({type(e).__name__}: "
          f"{str(e).strip()[:500]}).\n" + _prepare_instructions(name, data_dir)
      ) from e
  file_format = getattr(builder.info, "file_format", None)
  if file_format is not None and "array_record" not in str(file_format).lower():
    raise DatasetNotPreparedError(
        f"Dataset {name!r} in {builder.data_dir} is stored as {file_format}, but "
        f"random-access reading needs ArrayRecord. Re-prepare it with "
        f"`tfds build {name} --data_dir=DIR --file_format=array_record`."
    )
  return builder


def create_source(config, split: str):
  """The random-access source for ``split`` of ``config.dataset``."""
  if config.dataset == DIGITS:
    return DigitsSource(split)
  builder = _tfds_builder(config.dataset, config.data_dir, config.data_download)
  splits = builder.info.splits
  base_split = split.split("[")[0]
  if base_split not in splits:
    raise ConfigError(
        f"dataset={config.dataset!r} has splits {sorted(splits)}; got {split!r}."
    )
  return builder.as_data_source(split=split)


def get_dataset_info(config) -> DatasetInfo:
  """Number of classes, examples and channels; validates dataset and splits."""
  train = create_source(config, config.train_split)
  evals = create_source(config, config.eval_split)
  if config.dataset == DIGITS:
    num_classes, channels = train.num_classes, 1
  else:
    builder = _tfds_builder(config.dataset, config.data_dir, download=False)
    features = builder.info.features
    for key in ("image", "label"):
      if key not in features:
        raise ConfigError(
            f"dataset={config.dataset!r} has features {sorted(features)}; "
            f"image classification needs 'image' and 'label'."
        )
    num_classes = features["label"].num_classes
    channels = features["image"].shape[-1] or 3
  if len(train) == 0 or len(evals) == 0:
    raise ConfigError(
        f"dataset={config.dataset!r}: split {config.train_split!r} has "
        f"{len(train)} examples and {config.eval_split!r} has {len(evals)}; "
        f"both must be non-empty."
    )
  return DatasetInfo(
      name=config.dataset,
      num_classes=int(num_classes),
      num_train_examples=len(train),
      num_eval_examples=len(evals),
      num_channels=int(channels),
  )
