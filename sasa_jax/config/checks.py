"""Checks of a run's config against the declaration of its keys (:mod:`sasa_jax.config.keys`).

ml_collections refuses unknown keys and values of the wrong type. What it cannot know is
checked here, before anything is built or compiled: each key's allowed values, keys a
hand-built config lacks, and rules across keys; every problem is a ``ConfigError`` naming
the key and what it allows. :func:`differences` compares configs key by key (nested keys
as dotted paths), filling in the declared default of a key that a config saved by an
older version lacks; the resume check and the multi-process check read it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from sasa_jax.config import keys
from sasa_jax.errors import ConfigError


def validate_config(config) -> None:
  """Raises ``ConfigError`` naming every missing or badly valued key."""
  problems = [f"missing config key {key.name!r} ({key.allowed.description})"
              for key in keys.KEYS if key.name not in config]
  for key in keys.KEYS:
    if key.name in config and not key.allowed.check(config[key.name]):
      problems.append(f"config.{key.name}={config[key.name]!r} is invalid: allowed "
                      f"{key.allowed.description}")
  if not problems:
    problems = _cross_key_problems(config)
  if problems:
    raise ConfigError("Invalid config: " + "; ".join(problems) + ".")


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


def check_channels(config, num_channels: int) -> None:
  """Normalisation statistics: one per image channel, or one for all."""
  n = len(config.normalization_mean)
  if n not in (1, num_channels):
    raise ConfigError(
        f"config.normalization_mean/std have {n} values but dataset {config.dataset!r} "
        f"has {num_channels} channel(s); give 1 or {num_channels}.")


def config_to_dict(config) -> dict[str, Any]:
  """A JSON-normalised plain dict (tuples -> lists) for saving and comparing."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def with_defaults(saved: Mapping[str, Any]) -> dict[str, Any]:
  """A config saved as a dict, with each declared key (and ``model_overrides`` field)
  that it lacks at its default: what a config saved by an older version means now."""
  full = {name: keys.default_value(name) for name in keys.BY_NAME}
  for name, value in saved.items():
    if isinstance(value, Mapping) and isinstance(full.get(name), Mapping):
      value = {**full[name], **value}
    full[name] = value
  return full


def _flat(config: Mapping[str, Any]) -> dict[str, Any]:
  """``{'model_overrides.kernel_size': 5, ...}``: nested keys as dotted paths, each
  declared key that ``config`` lacks (saved by an older version) at its default."""
  flat = {}
  for name, value in with_defaults(config).items():
    if isinstance(value, Mapping):
      flat.update({f"{name}.{k}": v for k, v in value.items()})
    else:
      flat[name] = value
  return flat


def differences(*configs: Mapping[str, Any]) -> dict[str, tuple[Any, ...]]:
  """``{dotted key: (its value in each config, ...)}`` for every key whose value is not
  the same in all of them (plain dicts, as :func:`config_to_dict` gives; None where a
  config lacks an undeclared key)."""
  flats = [_flat(c) for c in configs]
  out = {}
  for path in sorted(set().union(*flats)):
    values = [f.get(path) for f in flats]
    if any(v != values[0] for v in values[1:]):
      out[path] = tuple(values)
  return out


def scope(path: str) -> keys.Scope:
  """The scope of a dotted key (a nested key has its top-level key's); an undeclared key
  (removed since a config was saved) counts as ``run``."""
  key = keys.BY_NAME.get(path.split(".")[0])
  return keys.Scope.RUN if key is None else key.scope


def format_differences(diffs: Mapping[str, tuple[Any, ...]], labels: tuple[str, ...]
                       ) -> str:
  """One indented line per key: ``  batch_size: 16 on process 0, 32 on process 1``."""
  return "\n".join(
      "  " + path + ": " + ", ".join(f"{v!r} {label}" for v, label in zip(values, labels))
      for path, values in diffs.items())
