"""Per-example preprocessing: the augmentations, the evaluation crop and the
normalisation on the device."""

from __future__ import annotations

import numpy as np

from sasa_jax.data import preprocessing as pp


def test_augmentations():
  rng = np.random.default_rng(0)
  image = np.arange(32 * 32 * 3, dtype=np.int64).reshape(32, 32, 3).astype(np.uint8)
  crop = pp.pad_crop_flip(image, rng, 32)
  assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8
  big = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
  outs = [pp.inception_crop(big, np.random.default_rng(s), 24) for s in range(4)]
  assert all(o.shape == (24, 24, 3) and o.dtype == np.uint8 for o in outs)
  assert len({o.tobytes() for o in outs}) == 4  # Random crops differ.
  marked = np.zeros((40, 60, 1), np.uint8)
  marked[10:30, 20:40] = 200  # The central 20x20 square.
  center = pp.center_crop(marked, 20, crop_fraction=0.5)
  assert center.shape == (20, 20, 1) and center.min() == 200
  x = pp.normalize_images(np.full((1, 2, 2, 3), 255, np.uint8), (0.5, 0.5, 0.5),
                          (0.25, 0.25, 0.25))
  np.testing.assert_allclose(np.asarray(x), 2.0)


def test_flip_augmentation_only_mirrors():
  """'flip' returns the image or its mirror (about half of each), nothing else."""
  image = np.arange(28 * 28, dtype=np.int64).reshape(28, 28, 1).astype(np.uint8)
  preprocess = pp.TrainPreprocess("flip", pp.ExampleSpec(28))
  rng = np.random.default_rng(0)
  outs = [preprocess({"image": image, "label": 3}, rng) for _ in range(200)]
  flipped = [np.array_equal(o["image"], image[:, ::-1]) for o in outs]
  assert all(f or np.array_equal(o["image"], image) for f, o in zip(flipped, outs))
  assert 60 < sum(flipped) < 140 and all(o["label"] == 3 for o in outs)
