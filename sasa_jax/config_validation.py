"""Checks a run's ``ml_collections.ConfigDict`` before anything is built or compiled.

The configs are locked ``ConfigDict``s, so ml_collections itself rejects unknown keys
(with "did you mean") and values of the wrong type, from Python and from the command
line. What it cannot know is checked here: each key's allowed range or choices
(:data:`SCHEMA`), keys a hand-built or older config lacks, and rules across keys. Every
problem raises a ``ConfigError`` (a ``ValueError``) naming the key and what is allowed.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from sasa_jax import preprocessing
from sasa_jax.errors import ConfigError

_Check = Callable[[Any], bool]


def _positive_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _non_negative_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
  def check(v) -> bool:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
      return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  return check


def _one_of(*allowed):
  def check(v) -> bool:
    return v in allowed
  check.allowed = allowed
  return check


def _optional(check: _Check) -> _Check:
  return lambda v: v is None or check(v)


def _str(v) -> bool:
  return isinstance(v, str) and bool(v)


def _floats(v) -> bool:
  return (isinstance(v, (tuple, list)) and len(v) > 0
          and all(isinstance(x, numbers.Real) for x in v))


_INF = float("inf")

# key -> (check, description of allowed values)
SCHEMA: dict[str, tuple[_Check, str]] = {
    "model": (_str, "a name from sasa_jax.models.list_models()"),
    "model_overrides": (lambda v: isinstance(v, (Mapping, ml_collections.ConfigDict)),
                        "a dict of keyword overrides for models.create"),
    "compute_dtype": (_one_of("float32", "bfloat16"), "'float32' or 'bfloat16'"),
    "dataset": (_str, "'digits' or a TFDS dataset name"),
    "data_dir": (lambda v: v is None or _str(v), "None or a directory"),
    "data_download": (lambda v: isinstance(v, bool), "True or False"),
    "train_split": (_str, "a split name of the dataset"),
    "eval_split": (_str, "a split name of the dataset"),
    "image_size": (_positive_int, "a positive int"),
    "augmentation": (_one_of(*preprocessing.AUGMENTATIONS),
                     " | ".join(map(repr, preprocessing.AUGMENTATIONS))),
    "eval_preprocessing": (_one_of(*preprocessing.EVAL_PREPROCESSINGS),
                           " | ".join(map(repr, preprocessing.EVAL_PREPROCESSINGS))),
    "eval_crop_fraction": (_number(0, 1, lo_open=True), "a float in (0, 1]"),
    "normalization_mean": (_floats, "a tuple of floats (one per channel, or one)"),
    "normalization_std": (lambda v: _floats(v) and all(x > 0 for x in v),
                          "a tuple of positive floats (one per channel, or one)"),
    "data_workers": (_non_negative_int, "an int >= 0"),
    "data_threads": (_positive_int, "a positive int"),
    "data_prefetch": (_positive_int, "a positive int"),
    "seed": (_non_negative_int, "an int >= 0"),
    "batch_size": (_positive_int, "a positive int (global batch)"),
    "eval_batch_size": (_positive_int, "a positive int (global batch)"),
    "num_epochs": (_number(0, _INF), "a float >= 0 (epochs of the train split)"),
    "num_train_steps": (_optional(_non_negative_int), "None (from num_epochs) or an int >= 0"),
    "num_eval_steps": (lambda v: isinstance(v, int) and (v == -1 or v > 0),
                       "-1 (whole split) or a positive int"),
    "optimizer": (_one_of("sgd", "adamw"), "'sgd' or 'adamw'"),
    "base_learning_rate": (_number(0, _INF, lo_open=True), "a float > 0"),
    "base_batch_size": (_positive_int, "a positive int"),
    "lr_schedule": (_one_of("cosine", "constant"), "'cosine' or 'constant'"),
    "warmup_epochs": (_number(0, _INF), "a float >= 0"),
    "warmup_steps": (_optional(_non_negative_int), "None (from warmup_epochs) or an int >= 0"),
    "momentum": (_number(0, 1, hi_open=True), "a float in [0, 1)"),
    "nesterov": (lambda v: isinstance(v, bool), "True or False"),
    "adam_b1": (_number(0, 1, hi_open=True), "a float in [0, 1)"),
    "adam_b2": (_number(0, 1, hi_open=True), "a float in [0, 1)"),
    "weight_decay": (_number(0, _INF), "a float >= 0"),
    "grad_clip_norm": (_number(0, _INF), "a float >= 0 (0: off)"),
    "label_smoothing": (_number(0, 1, hi_open=True), "a float in [0, 1)"),
    "ema_decay": (_number(0, 1, hi_open=True), "a float in [0, 1) (0: off)"),
    "ema_warmup": (lambda v: isinstance(v, bool), "True or False"),
    "log_every_steps": (_positive_int, "a positive int"),
    "eval_every_epochs": (_number(0, _INF, lo_open=True), "a float > 0"),
    "eval_every_steps": (_optional(_positive_int),
                         "None (from eval_every_epochs) or a positive int"),
    "checkpoint_every_epochs": (_number(0, _INF, lo_open=True), "a float > 0"),
    "checkpoint_every_steps": (_optional(_positive_int),
                               "None (from checkpoint_every_epochs) or a positive int"),
    "max_to_keep": (_positive_int, "a positive int"),
    "async_checkpointing": (lambda v: isinstance(v, bool), "True or False"),
}

# Keys that may change when a run is resumed: they steer the loop, not the result.
RUN_CONTROL_KEYS = frozenset({
    "data_dir", "data_download", "data_workers", "data_threads", "data_prefetch",
    "eval_batch_size", "num_eval_steps", "log_every_steps", "eval_every_steps",
    "checkpoint_every_steps", "max_to_keep", "async_checkpointing",
    "num_train_steps", "num_epochs", "eval_every_epochs", "checkpoint_every_epochs",
})


def validate_config(config) -> None:
  """Raises ``ConfigError`` naming every missing or badly valued key."""
  problems = [f"missing config key {key!r} ({allowed})"
              for key, (_, allowed) in SCHEMA.items() if key not in config]
  for key, (check, allowed) in SCHEMA.items():
    if key in config and not check(config[key]):
      problems.append(f"config.{key}={config[key]!r} is invalid: allowed {allowed}")
  if not problems:
    problems = _cross_key_problems(config)
  if problems:
    raise ConfigError("Invalid config:\n  " + "\n  ".join(problems))


def _cross_key_problems(config) -> list[str]:
  problems = []
  if len(config.normalization_mean) != len(config.normalization_std):
    problems.append(
        f"config.normalization_mean has {len(config.normalization_mean)} values but "
        f"config.normalization_std has {len(config.normalization_std)}; they must match")
  if config.num_train_steps is None and config.num_epochs == 0:
    problems.append("config.num_epochs=0 with config.num_train_steps unset: nothing to "
                    "train; set one of them")
  return problems


def check_batch_sizes(config, num_devices: int, num_processes: int) -> None:
  """Global batches must split evenly over devices (and hence over hosts)."""
  for key in ("batch_size", "eval_batch_size"):
    value = config[key]
    if value % num_devices or value % num_processes:
      lower = value - value % num_devices
      raise ConfigError(
          f"config.{key}={value} is not divisible by the number of devices "
          f"({num_devices} over {num_processes} process(es)): each device takes an "
          f"equal share of the global batch. Use a multiple of {num_devices}, "
          f"e.g. {max(lower, num_devices)} or {lower + num_devices}.")


def check_channels(config, num_channels: int) -> None:
  """Normalisation statistics: one per image channel, or one for all."""
  n = len(config.normalization_mean)
  if n not in (1, num_channels):
    raise ConfigError(
        f"config.normalization_mean/std have {n} values but dataset "
        f"{config.dataset!r} has {num_channels} channel(s); give 1 or "
        f"{num_channels}.")


def config_to_dict(config) -> dict[str, Any]:
  """A JSON-normalised plain dict (tuples -> lists) for saving and comparing."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def config_differences(*configs: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
  """``{key: (its value in each config, ...)}`` for every top-level key whose value
  is not the same in all of them (None where a config lacks the key)."""
  missing = object()
  out = {}
  for key in sorted(set().union(*configs)):
    values = [c.get(key, missing) for c in configs]
    if any(v != values[0] for v in values[1:]):
      out[key] = tuple(None if v is missing else v for v in values)
  return out
