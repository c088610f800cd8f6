"""Input pipeline: random-access sources -> grain -> per-host batches of uint8 images.

Two kinds of source share one interface (``__len__`` and ``__getitem__`` returning
``{'image': uint8 (H, W, C), 'label': int}``):

* ``dataset='digits'``: scikit-learn's ``load_digits`` (1797 real 8x8 handwritten
  digits that ship inside the wheel), split once, deterministically, 80/20 into
  ``'train'`` and ``'test'``. Runs with no network.
* any other name: a TFDS dataset read with ``tfds.data_source`` (ArrayRecord files,
  no TensorFlow needed to read). If it is not prepared, TFDS is asked to download
  and prepare it; if that fails, :class:`DatasetNotPreparedError` says how to prepare
  it offline.

Determinism and resuming. The training stream is a pure function of
``(seed, step)``: the source is shuffled (differently each epoch), augmented with a
per-example RNG derived from the seed and the example's global position, and cut
into global batches of ``batch_size``. Host ``p`` of ``P`` reads only rows
``[p*B/P, (p+1)*B/P)`` of every global batch, so the global batch at a given step
is the same whatever the number of hosts, and resuming at step ``s`` starts the
stream at global batch ``s`` (grain ``MapDataset`` is random-access, so skipping is
free). Images stay ``uint8`` until they reach the device; normalisation happens in
the jitted step (:func:`normalize_images`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax.numpy as jnp
import numpy as np

from sasa_jax.errors import ConfigError, DataError, DatasetNotPreparedError

DIGITS = "digits"
DIGITS_SPLITS = ("train", "test")
AUGMENTATIONS = ("none", "cifar", "inception")
EVAL_PREPROCESSINGS = ("none", "center_crop")

Example = dict[str, Any]
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the rest of the program needs to know about a dataset split pair."""

  name: str
  num_classes: int
  num_train_examples: int
  num_eval_examples: int
  num_channels: int


# ---------------------------------------------------------------------------
# Sources.


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


# ---------------------------------------------------------------------------
# Preprocessing (numpy, on the host, per example; uint8 in, uint8 out).


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


def _as_example(example: Mapping[str, Any]) -> Example:
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

  'none' and 'cifar' keep the image size (it must be ``image_size``); 'inception'
  crops and resizes any image.
  """

  augmentation: str
  spec: ExampleSpec

  def __call__(self, example: Mapping[str, Any], rng: np.random.Generator) -> Example:
    ex = _as_example(example)
    size = self.spec.image_size
    if self.augmentation == "cifar" and ex["image"].shape[:2] == (size, size):
      ex["image"] = pad_crop_flip(ex["image"], rng, size)
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
    ex = _as_example(example)
    if self.preprocessing == "center_crop":
      ex["image"] = center_crop(ex["image"], self.spec.image_size, self.crop_fraction)
    return self.spec.check(ex, self.preprocessing)


def normalize_images(images: jnp.ndarray, mean: Sequence[float],
                     std: Sequence[float]) -> jnp.ndarray:
  """uint8 ``(B, H, W, C)`` -> float32 ``(x / 255 - mean) / std`` (on device)."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ---------------------------------------------------------------------------
# Iterators.


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
  if config.batch_size % num_p:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by the "
                     f"number of processes ({num_p}).")
  host_batch = config.batch_size // num_p
  ds = grain.MapDataset.source(source).shuffle(seed=config.seed).repeat()
  ds = ds.random_map(TrainPreprocess(config.augmentation, _spec(config, info)),
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
  if config.eval_batch_size % num_p:
    raise ConfigError(f"eval_batch_size={config.eval_batch_size} is not divisible "
                     f"by the number of processes ({num_p}).")
  host_batch = config.eval_batch_size // num_p
  num_batches = num_eval_batches(len(source), config, num_p)
  ds = grain.MapDataset.source(source)[p::num_p]
  ds = ds.map(EvalPreprocess(config.eval_preprocessing, _spec(config, info),
                             config.eval_crop_fraction))
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


def _spec(config, info: DatasetInfo | None) -> ExampleSpec:
  if info is None:
    return ExampleSpec(config.image_size)
  return ExampleSpec(config.image_size, info.num_channels, info.num_classes)


def _num_channels(source) -> int:
  return _as_example(source[0])["image"].shape[-1]


def take(iterator: Iterator[Batch], n: int) -> list[Batch]:
  """The next ``n`` batches (for tests and notebooks)."""
  return [next(iterator) for _ in range(n)]


def close(iterator: Any) -> None:
  """Releases an iterator's worker processes, if it has any."""
  closer: Callable[[], None] | None = getattr(iterator, "close", None)
  if closer is not None:
    closer()
