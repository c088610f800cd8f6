"""The data: sources, TFDS preparation, per-example preprocessing, and batches.

* :mod:`~sasa_jax.data.sources`: ``open_dataset(config)``, the random-access sources of a
  dataset's splits and its ``DatasetInfo`` (the embedded digits, or TFDS);
* :mod:`~sasa_jax.data.tfds_preparation`: downloading and preparing TFDS datasets
  (``python -m sasa_jax.data prepare NAME --data_dir=DIR``);
* :mod:`~sasa_jax.data.preprocessing`: augmentation, evaluation crop, and the
  normalisation that runs on the device;
* :mod:`~sasa_jax.data.pipeline`: this host's batches of the training stream and of one
  pass over the eval split (grain).
"""

from sasa_jax.data.pipeline import close, eval_iterator, take, train_iterator
from sasa_jax.data.preprocessing import normalize_images
from sasa_jax.data.sources import Dataset, DatasetInfo, DigitsSource, open_dataset

__all__ = ["Dataset", "DatasetInfo", "DigitsSource", "close", "eval_iterator",
           "normalize_images", "open_dataset", "take", "train_iterator"]
