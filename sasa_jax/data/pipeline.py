"""Input pipeline: a random-access source -> grain -> this host's batches of uint8 images.

Sources come from :mod:`sasa_jax.data.sources`, the per-example preprocessing from
:mod:`sasa_jax.data.preprocessing`; this module cuts them into batches.

Determinism and resuming. The training stream is a pure function of
``(seed, step)``: the source is shuffled (differently each epoch), augmented with a
per-example RNG derived from the seed and the example's global position, and cut
into global batches of ``batch_size``. Host ``p`` of ``P`` reads only rows
``[p*B/P, (p+1)*B/P)`` of every global batch, so the global batch at a given step
is the same whatever the number of hosts, and resuming at step ``s`` starts the
stream at global batch ``s`` (grain ``MapDataset`` is random-access, so skipping is
free). Images stay ``uint8`` until they reach the device; normalisation happens in
the jitted step (:func:`sasa_jax.data.preprocessing.normalize_images`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import grain
import numpy as np

from sasa_jax.data import preprocessing
from sasa_jax.data.sources import DatasetInfo
from sasa_jax.distributed import mesh

Batch = dict[str, np.ndarray]


def _read_options(config) -> grain.ReadOptions:
  return grain.ReadOptions(num_threads=max(1, config.data_threads),
                           prefetch_buffer_size=max(1, config.data_prefetch))


def _maybe_mp_prefetch(ds: grain.IterDataset, config) -> grain.IterDataset:
  if config.data_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top

    if not flags.FLAGS.is_parsed():  # grain reads its absl flags (notebooks, tests).
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.data_workers))
  return ds


def _process_index_and_count(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top

    return jax.process_index(), jax.process_count()
  return process_index, process_count


def _host_batch(config, key: str, process_count: int) -> int:
  """The rows of global batch ``config[key]`` that each of ``process_count`` hosts reads."""
  mesh.check_batch_size(key, config[key], process_count, f"{process_count} process(es)")
  return config[key] // process_count


def train_dataset(source, config, *, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None,
                  info: DatasetInfo | None = None) -> grain.MapDataset:
  """This host's infinite stream of training batches, starting at ``start_step``.

  Element ``i`` is this host's ``batch_size // process_count`` rows of global batch
  ``start_step + i``: ``{'image': uint8 (b, H, W, C), 'label': int32 (b,)}``.
  With ``info``, every example's channels and label are checked against it.
  """
  p, num_p = _process_index_and_count(process_index, process_count)
  host_batch = _host_batch(config, "batch_size", num_p)
  ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
  ds = ds.random_map(
      preprocessing.TrainPreprocess(config.augmentation, _spec(config, info)),
      seed=config.seed + 1)
  ds = ds.batch(host_batch, drop_remainder=True)
  # Chunk c of `host_batch` rows is row block (c % P) of global batch (c // P).
  return ds[start_step * num_p + p :: num_p]


def train_iterator(source, config, *, start_step: int = 0,
                   process_index: int | None = None,
                   process_count: int | None = None,
                   info: DatasetInfo | None = None) -> Iterator[Batch]:
  """A prefetching iterator over :func:`train_dataset` (close it when done)."""
  ds = train_dataset(source, config, start_step=start_step, info=info,
                     process_index=process_index, process_count=process_count)
  ds = _maybe_mp_prefetch(ds.to_iter_dataset(_read_options(config)), config)
  return iter(ds)


def num_eval_batches(num_examples: int, config, process_count: int) -> int:
  """Batches per host that cover the split once (hosts pad to the same count)."""
  per_host = math.ceil(num_examples / process_count)
  total = math.ceil(per_host / (config.eval_batch_size // process_count))
  if config.num_eval_steps > 0:
    total = min(total, config.num_eval_steps)
  return total


class _PadBatch:
  """Pads a (possibly short) host batch to ``size`` rows with a 0/1 ``mask``."""

  def __init__(self, size: int):
    self.size = size

  def __call__(self, batch: Batch) -> Batch:
    n = len(batch["label"])
    out = {k: np.concatenate([v, np.zeros((self.size - n, *v.shape[1:]), v.dtype)])
           for k, v in batch.items()}
    out["mask"] = (np.arange(self.size) < n).astype(np.float32)
    return out


def eval_iterator(source, config, *, process_index: int | None = None,
                  process_count: int | None = None,
                  info: DatasetInfo | None = None) -> Iterator[Batch]:
  """One pass over the eval split: this host's padded batches with a ``mask``.

  Host ``p`` reads examples ``p, p + P, ...``; every host yields exactly
  :func:`num_eval_batches` batches (empty rows have ``mask == 0``), so that the
  global arrays line up.
  """
  p, num_p = _process_index_and_count(process_index, process_count)
  host_batch = _host_batch(config, "eval_batch_size", num_p)
  num_batches = num_eval_batches(len(source), config, num_p)
  ds = grain.MapDataset.source(source)[p::num_p]
  ds = ds.map(preprocessing.EvalPreprocess(
      config.eval_preprocessing, _spec(config, info), config.eval_crop_fraction))
  ds = ds.batch(host_batch).map(_PadBatch(host_batch))
  ds = ds[:num_batches]
  it = iter(_maybe_mp_prefetch(ds.to_iter_dataset(_read_options(config)), config))
  produced = 0
  try:
    for batch in it:
      produced += 1
      yield batch
  finally:
    if hasattr(it, "close"):
      it.close()
  # A host whose shard is one batch shorter pads with an all-masked batch.
  if produced < num_batches:
    image_shape = (host_batch, config.image_size, config.image_size,
                   _num_channels(source))
    for _ in range(num_batches - produced):
      yield {"image": np.zeros(image_shape, np.uint8),
             "label": np.zeros((host_batch,), np.int32),
             "mask": np.zeros((host_batch,), np.float32)}


def _spec(config, info: DatasetInfo | None) -> preprocessing.ExampleSpec:
  if info is None:
    return preprocessing.ExampleSpec(config.image_size)
  return preprocessing.ExampleSpec(config.image_size, info.num_channels,
                                   info.num_classes)


def _num_channels(source) -> int:
  return preprocessing.as_example(source[0])["image"].shape[-1]


def take(iterator: Iterator[Batch], n: int) -> list[Batch]:
  """The next ``n`` batches (for tests and notebooks)."""
  return [next(iterator) for _ in range(n)]


def close(iterator: Any) -> None:
  """Releases an iterator's worker processes, if it has any."""
  closer: Callable[[], None] | None = getattr(iterator, "close", None)
  if closer is not None:
    closer()
