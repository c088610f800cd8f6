"""Errors the user can fix. ``train.py`` prints them without a traceback."""


class Error(Exception):
  """Base class: a clear message saying what is wrong and what to do."""


class ConfigError(Error, ValueError):
  """A config key or flag is unknown, missing or has a bad value."""


class WorkdirError(Error, ValueError):
  """The workdir holds something else, a different run, or no checkpoint."""


class CorruptCheckpointError(WorkdirError):
  """A checkpoint that cannot be read back as it was saved: a file is missing or
  unreadable, or an array's values no longer match the checksum saved with them."""


class CheckpointSaveError(Error, RuntimeError):
  """Writing a checkpoint failed (disk full, read-only, ...); the run stops and the
  checkpoints saved before are kept."""


class DatasetNotPreparedError(Error, RuntimeError):
  """A TFDS dataset is not prepared in ``data_dir`` and could not be prepared."""


class MissingDependencyError(Error, ImportError):
  """A Python package that this step needs (e.g. to prepare a dataset) is missing."""


class NonFiniteLossError(Error, FloatingPointError):
  """The loss or gradients became NaN/Inf; that state is never checkpointed."""


class DataError(Error, ValueError):
  """An example or batch that the model cannot take (shape, channels, label)."""


class TrainingInterrupted(Exception):
  """A signal (SIGTERM: preemption, ``kill``; SIGINT: Ctrl-C) stopped training after a
  checkpoint was saved; re-run to resume. ``signum``: the signal."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum
