"""Datasets: the embedded digits, and the errors for unprepared and unknown TFDS
datasets."""

from __future__ import annotations

import numpy as np
import pytest

from sasa_jax import datasets
from sasa_jax.errors import ConfigError, DatasetNotPreparedError


def test_digits_splits_are_disjoint_real_digits(make_config):
  train, test = datasets.DigitsSource("train"), datasets.DigitsSource("test")
  assert (len(train), len(test)) == (1437, 360)
  ex = train[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  assert ex["image"].max() <= 240
  train_images = {train[i]["image"].tobytes() for i in range(len(train))}
  test_images = [test[i]["image"].tobytes() for i in range(len(test))]
  # load_digits has a few duplicate images; the index split keeps them rare.
  assert sum(t in train_images for t in test_images) < 10
  assert sorted({int(test[i]["label"]) for i in range(len(test))}) == list(range(10))
  info = datasets.get_dataset_info(make_config())
  assert (info.num_classes, info.num_channels) == (10, 1)
  with pytest.raises(ConfigError, match="splits"):
    datasets.DigitsSource("validation")


def test_unprepared_dataset_says_how_to_prepare_it(make_config, manual_tfds_builder,
                                                   tmp_path):
  config = make_config(dataset=manual_tfds_builder, data_dir=str(tmp_path))
  with pytest.raises(DatasetNotPreparedError) as err:
    datasets.get_dataset_info(config)
  message = str(err.value)
  assert "could not be downloaded" in message and "manual" in message
  assert f"tfds build {manual_tfds_builder}" in message and "--data_dir" in message
  config.data_download = False
  with pytest.raises(DatasetNotPreparedError, match="is not prepared"):
    datasets.get_dataset_info(config)


def test_unknown_dataset_is_a_clear_error(make_config, tmp_path):
  with pytest.raises(ConfigError, match="Unknown config.dataset='cifar_10'.*cifar10"):
    datasets.get_dataset_info(make_config(dataset="cifar_10", data_dir=str(tmp_path)))
