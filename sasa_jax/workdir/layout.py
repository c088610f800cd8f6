"""A run's workdir: what it holds, and the checks that keep it to one run::

    <workdir>/config.json              the run's config (a record for people, never read)
    <workdir>/lock                     held by the run in progress (pid, host, command)
    <workdir>/checkpoints/<step>/      Orbax: 'state' (TrainState), 'data_iterator'
                                       (the input's position), 'config' (the run's
                                       config), 'checksums' (one per array of 'state')
    <workdir>/corrupt_checkpoints/     damaged checkpoints, moved aside (never deleted)
    <workdir>/tensorboard/             event files
    <workdir>/evaluation.json          written by `train.py --mode=evaluate`
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any

import jax

from sasa_jax.config import checks
from sasa_jax.errors import WorkdirError

CONFIG_FILE = "config.json"
LOCK_FILE = "lock"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
TENSORBOARD_DIR = "tensorboard"
EVALUATION_FILE = "evaluation.json"

# What only a run's workdir holds.
_RUN_ENTRIES = {CONFIG_FILE, CHECKPOINT_DIR, CORRUPT_DIR, LOCK_FILE}


def check_workdir(workdir: str) -> None:
  """Refuses a non-empty workdir that is not one of ours (nothing is overwritten)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir={workdir!r} exists and is not a directory.")
  if not os.path.isdir(workdir):
    return
  entries = set(os.listdir(workdir))
  if entries and not entries & _RUN_ENTRIES:
    shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
    raise WorkdirError(
        f"workdir={workdir!r} is not empty and holds no sasa_jax run (no {CONFIG_FILE} "
        f"nor {CHECKPOINT_DIR}/; found: {shown}). Choose a new or empty directory, or "
        f"the workdir of an earlier run to resume it.")


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """Writes ``obj`` as indented JSON atomically: a killed run leaves the old file,
  a failed write (disk full) leaves no temporary file."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(obj, f, indent=2, **dump_kwargs)
    os.replace(tmp, path)
  except OSError:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def save_config(workdir: str, config) -> None:
  """Writes ``config.json`` (process 0), atomically: the run's config, for people (the
  checks read the config saved in each checkpoint)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, CONFIG_FILE), checks.config_to_dict(config),
             sort_keys=True)
