"""Input pipeline: determinism, resuming, host sharding, eval coverage, worker
processes, and batches of a real TFDS dataset built locally."""

from __future__ import annotations

import numpy as np
import pytest

from sasa_jax import data
from sasa_jax.data import pipeline as ip
from sasa_jax.errors import ConfigError


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


def test_tfds_dataset_built_locally(make_config, tiny_tfds_dir):
  config = make_config(dataset="sasa_test_digits", data_dir=tiny_tfds_dir,
                       batch_size=8, eval_batch_size=16, augmentation="cifar")
  info = data.open_dataset(config).info
  assert (info.num_classes, info.num_train_examples, info.num_eval_examples,
          info.num_channels) == (10, 96, 40, 1)
  src = data.open_dataset(config).source("train")
  batches = ip.take(ip.train_iterator(src, config), 13)  # Over an epoch boundary.
  assert batches[0]["image"].shape == (8, 8, 8, 1)
  assert batches[0]["image"].dtype == np.uint8
  again = ip.take(ip.train_iterator(src, config, start_step=12), 1)[0]
  np.testing.assert_array_equal(again["image"], batches[12]["image"])
  eval_src = data.open_dataset(config).source("test")
  labels = np.concatenate([b["label"][b["mask"] == 1]
                           for b in ip.eval_iterator(eval_src, config)])
  expected = [int(eval_src[i]["label"]) for i in range(len(eval_src))]
  assert sorted(labels.tolist()) == sorted(expected)
  with pytest.raises(ConfigError, match=r"splits \['test', 'train'\]"):
    data.open_dataset(config).source("validation")


@pytest.mark.slow
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
