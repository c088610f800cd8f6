"""Input pipeline: sources, determinism, resuming, host sharding, eval coverage,
augmentations, and the TFDS path on a real dataset built locally."""

from __future__ import annotations

import numpy as np
import pytest

from sasa_jax import input_pipeline as ip
from sasa_jax.errors import ConfigError, DatasetNotPreparedError


class IndexSource:
  """Example ``i`` is a constant image of value ``i % 256`` with label ``i``."""

  def __init__(self, n: int, size: int = 8):
    self.n, self.size = n, size

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"image": np.full((self.size, self.size, 1), i % 256, np.uint8),
            "label": i}


def _labels(batches):
  return np.stack([b["label"] for b in batches])


def test_digits_splits_are_disjoint_real_digits(make_config):
  train, test = ip.DigitsSource("train"), ip.DigitsSource("test")
  assert (len(train), len(test)) == (1437, 360)
  ex = train[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  assert ex["image"].max() <= 240
  train_images = {train[i]["image"].tobytes() for i in range(len(train))}
  test_images = [test[i]["image"].tobytes() for i in range(len(test))]
  # load_digits has a few duplicate images; the index split keeps them rare.
  assert sum(t in train_images for t in test_images) < 10
  assert sorted({int(test[i]["label"]) for i in range(len(test))}) == list(range(10))
  info = ip.get_dataset_info(make_config())
  assert (info.num_classes, info.num_channels) == (10, 1)
  with pytest.raises(ConfigError, match="splits"):
    ip.DigitsSource("validation")


def test_train_stream_is_deterministic_and_reshuffles_each_epoch(make_config):
  config = make_config(batch_size=10)
  src = IndexSource(50)
  first = _labels(ip.take(ip.train_iterator(src, config), 10))
  again = _labels(ip.take(ip.train_iterator(src, config), 10))
  np.testing.assert_array_equal(first, again)
  # Each epoch (5 batches of 10) is a permutation of the 50 examples, and the
  # two epochs are shuffled differently.
  epochs = first.reshape(2, 50)
  for epoch in epochs:
    assert sorted(epoch) == list(range(50))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(50))
  other = _labels(ip.take(ip.train_iterator(src, make_config(batch_size=10, seed=1)), 5))
  assert not np.array_equal(other, first[:5])


def test_resume_starts_at_the_step(make_config):
  config = make_config(batch_size=8, augmentation="cifar")
  src = IndexSource(30)
  stream = ip.take(ip.train_iterator(src, config), 9)
  resumed = ip.take(ip.train_iterator(src, config, start_step=6), 3)
  for a, b in zip(stream[6:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])  # Same augmentation.


@pytest.mark.parametrize("num_hosts", [2, 4])
def test_hosts_read_disjoint_rows_of_the_same_global_batch(make_config, num_hosts):
  config = make_config(batch_size=8)
  src = IndexSource(40)
  single = _labels(ip.take(ip.train_iterator(src, config, start_step=3), 4))
  per_host = [
      _labels(ip.take(ip.train_iterator(src, config, start_step=3, process_index=p,
                                        process_count=num_hosts), 4))
      for p in range(num_hosts)]
  assert all(h.shape == (4, 8 // num_hosts) for h in per_host)
  np.testing.assert_array_equal(np.concatenate(per_host, axis=1), single)


@pytest.mark.parametrize("num_hosts,eval_batch", [(1, 16), (3, 12)])
def test_eval_covers_each_example_once(make_config, num_hosts, eval_batch):
  config = make_config(eval_batch_size=eval_batch)
  src = IndexSource(37)
  seen, counts = [], []
  for p in range(num_hosts):
    batches = list(ip.eval_iterator(src, config, process_index=p,
                                    process_count=num_hosts))
    counts.append(len(batches))
    for b in batches:
      assert b["image"].shape[0] == eval_batch // num_hosts
      seen.extend(b["label"][b["mask"] == 1].tolist())
  assert len(set(counts)) == 1  # Every host runs the same number of eval steps.
  assert sorted(seen) == list(range(37))
  limited = list(ip.eval_iterator(src, make_config(eval_batch_size=eval_batch,
                                                   num_eval_steps=1),
                                  process_index=0, process_count=num_hosts))
  assert len(limited) == 1


def test_batch_not_divisible_by_hosts_is_a_clear_error(make_config):
  with pytest.raises(ConfigError, match="batch_size=10 is not divisible"):
    ip.train_dataset(IndexSource(20), make_config(batch_size=10), process_index=0,
                     process_count=4)


def test_augmentations():
  rng = np.random.default_rng(0)
  image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3).astype(np.uint8)
  crop = ip.pad_crop_flip(image, rng, 32)
  assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
  big = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
  outs = [ip.inception_crop(big, np.random.default_rng(s), 24) for s in range(4)]
  assert all(o.shape == (24, 24, 3) and o.dtype == np.uint8 for o in outs)
  assert len({o.tobytes() for o in outs}) == 4  # Random crops differ.
  marked = np.zeros((40, 60, 1), np.uint8)
  marked[10:30, 20:40] = 200  # The central 20x20 square.
  center = ip.center_crop(marked, 20, crop_fraction=0.5)
  assert center.shape == (20, 20, 1) and center.min() == 200
  x = ip.normalize_images(np.full((1, 2, 2, 3), 255, np.uint8), (0.5, 0.5, 0.5),
                          (0.25, 0.25, 0.25))
  np.testing.assert_allclose(np.asarray(x), 2.0)


def test_tfds_dataset_built_locally(make_config, tiny_tfds_dir):
  config = make_config(dataset="sasa_test_digits", data_dir=tiny_tfds_dir,
                       batch_size=8, eval_batch_size=16, augmentation="cifar")
  info = ip.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples,
          info.num_channels) == (10, 96, 40, 1)
  src = ip.create_source(config, "train")
  batches = ip.take(ip.train_iterator(src, config), 13)  # Over an epoch boundary.
  assert batches[0]["image"].shape == (8, 8, 8, 1)
  assert batches[0]["image"].dtype == np.uint8
  again = ip.take(ip.train_iterator(src, config, start_step=12), 1)[0]
  np.testing.assert_array_equal(again["image"], batches[12]["image"])
  eval_src = ip.create_source(config, "test")
  labels = np.concatenate([b["label"][b["mask"] == 1]
                           for b in ip.eval_iterator(eval_src, config)])
  expected = [int(eval_src[i]["label"]) for i in range(len(eval_src))]
  assert sorted(labels.tolist()) == sorted(expected)
  with pytest.raises(ConfigError, match=r"splits \['test', 'train'\]"):
    ip.create_source(config, "validation")


def test_unprepared_dataset_says_how_to_prepare_it(make_config, manual_tfds_builder,
                                                   tmp_path):
  config = make_config(dataset=manual_tfds_builder, data_dir=str(tmp_path))
  with pytest.raises(DatasetNotPreparedError) as err:
    ip.get_dataset_info(config)
  message = str(err.value)
  assert "could not be downloaded" in message and "manual" in message
  assert f"tfds build {manual_tfds_builder}" in message and "--data_dir" in message
  config.data_download = False
  with pytest.raises(DatasetNotPreparedError, match="is not prepared"):
    ip.get_dataset_info(config)


def test_unknown_dataset_is_a_clear_error(make_config, tmp_path):
  with pytest.raises(ConfigError, match="Unknown config.dataset='cifar_10'.*cifar10"):
    ip.get_dataset_info(make_config(dataset="cifar_10", data_dir=str(tmp_path)))


def test_worker_processes_give_the_same_stream(make_config):
  """The real configs decode in grain worker processes: same batches, same resume."""
  config = make_config(batch_size=8, augmentation="cifar")
  src = IndexSource(30)
  in_process = ip.take(ip.train_iterator(src, config, start_step=2), 4)
  config.data_workers = 2
  it = ip.train_iterator(src, config, start_step=2)
  try:
    with_workers = ip.take(it, 4)
  finally:
    ip.close(it)
  for a, b in zip(in_process, with_workers):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_array_equal(a["image"], b["image"])
  labels = np.concatenate([b["label"][b["mask"] == 1]
                           for b in ip.eval_iterator(src, make_config(
                               eval_batch_size=8, data_workers=2))])
  assert sorted(labels.tolist()) == list(range(30))
