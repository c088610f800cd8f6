"""The workdir: Orbax checkpoints, the run's config beside them, and its checks.

Layout of a workdir::

    <workdir>/config.json          the run's config (written before the first step)
    <workdir>/checkpoints/<step>/  Orbax: 'state' (TrainState) + 'data_iterator'
    <workdir>/tensorboard/         event files
    <workdir>/evaluation.json      written by `train.py --mode=evaluate`

Each checkpoint holds the complete train state (step, parameters, BatchNorm
statistics, optimizer state, EMA) and the input pipeline's position, so a resumed
run continues exactly where the saved one was. Saves are atomic (Orbax writes a
temporary directory and renames it), so a run killed at any moment leaves only
complete checkpoints; a checkpoint that cannot be read is set aside in
``<workdir>/corrupt_checkpoints/`` and the newest readable one is used instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from sasa_jax import config_validation
from sasa_jax.errors import WorkdirError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
TENSORBOARD_DIR = "tensorboard"
EVALUATION_FILE = "evaluation.json"


def check_workdir(workdir: str) -> None:
  """Refuses a non-empty workdir that is not one of ours (nothing is overwritten)."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"workdir={workdir!r} exists and is not a directory.")
  if not os.path.isdir(workdir):
    return
  entries = set(os.listdir(workdir))
  if entries and not entries & {CONFIG_FILE, CHECKPOINT_DIR}:
    shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
    raise WorkdirError(
        f"workdir={workdir!r} is not empty and holds no sasa_jax run (no "
        f"{CONFIG_FILE} nor {CHECKPOINT_DIR}/; found: {shown}). Choose a new or "
        f"empty directory, or the workdir of an earlier run to resume it.")


def load_config_dict(workdir: str) -> dict[str, Any] | None:
  """The config saved in ``workdir`` as a plain dict, or None."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def save_config(workdir: str, config) -> None:
  """Writes ``config.json`` (process 0), atomically."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, CONFIG_FILE), config_validation.config_to_dict(config),
             sort_keys=True)


def write_json(path: str, obj: Any, **dump_kwargs) -> None:
  """Writes ``obj`` as indented JSON atomically: a killed run leaves the old file."""
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, **dump_kwargs)
  os.replace(path + ".tmp", path)


def check_config_matches(workdir: str, config) -> None:
  """Compares ``config`` with the one saved in ``workdir`` before any step.

  Keys that only steer the loop (:data:`config_validation.RUN_CONTROL_KEYS`, e.g.
  ``num_train_steps`` or ``eval_every_steps``) may change: a warning lists them.
  Any other difference means the checkpoints belong to another experiment, and
  raises :class:`WorkdirError` listing the differing keys.
  """
  saved = load_config_dict(workdir)
  if saved is None:
    return
  diffs = config_validation.config_differences(
      saved, config_validation.config_to_dict(config))
  fatal = {k: v for k, v in diffs.items()
           if k not in config_validation.RUN_CONTROL_KEYS}
  if fatal:
    lines = "\n".join(f"  {k}: saved={a!r}, now={b!r}" for k, (a, b) in fatal.items())
    raise WorkdirError(
        f"workdir={workdir!r} holds a run with a different config:\n{lines}\n"
        f"Resume it with the same config (or omit --config with --mode=evaluate), "
        f"or use another workdir.")
  if diffs:
    logging.warning("Resuming %s with changed settings: %s", workdir, ", ".join(
        f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items()))


class Checkpointer:
  """An Orbax ``CheckpointManager`` for the train state and the data position.

  ``should_save(step)`` is Orbax's decision: every ``save_interval_steps``, and at a
  preemption sync point of a multi-process run (``reached_preemption``).
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3,
               save_interval_steps: int | None = None,
               async_checkpointing: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.workdir = workdir
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        enable_async_checkpointing=async_checkpointing,
        create=not read_only,
        # Leftovers of a save that was killed half-way.
        cleanup_tmp_directories=not read_only,
        save_decision_policy=_save_decision_policy(save_interval_steps),
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data_iterator": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def reached_preemption(self, step: int) -> bool:
    """Whether all processes of a ``jax.distributed`` run reached the preemption
    sync point at ``step`` (a SIGTERM arrived); always False in a single process."""
    return self._manager.reached_preemption(step)

  def save(self, step: int, state: Any, data_position: dict[str, Any]) -> None:
    """Saves (asynchronously when enabled) ``state`` and the data position."""
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data_iterator=ocp.args.JsonSave(data_position),
        ),
        force=True,
    )

  def restore(self, step: int, abstract_state: Any
              ) -> tuple[Any, dict[str, Any] | None]:
    """The state (shaped and sharded like ``abstract_state``) and data position."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data_iterator=ocp.args.JsonRestore(),
        ),
    )
    return restored["state"], restored["data_iterator"]

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Only the train state (for evaluation)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises :class:`WorkdirError` listing the arrays whose names or shapes differ
    between checkpoint ``step`` and ``abstract_state`` (another model or optimizer).
    Other errors (an unreadable checkpoint) propagate."""
    saved = _flat_shapes(self._manager.item_metadata(step)["state"])
    wanted = _flat_shapes(abstract_state)
    order = lambda k: (not k.startswith("params."), k)  # Parameters first.
    missing = sorted(set(wanted) - set(saved), key=order)
    unexpected = sorted(set(saved) - set(wanted), key=order)
    changed = sorted((k for k in set(saved) & set(wanted) if saved[k] != wanted[k]),
                     key=order)
    if not (missing or unexpected or changed):
      return
    lines = []
    for title, keys, show in (
        ("in this config, not in the checkpoint", missing, lambda k: wanted[k]),
        ("in the checkpoint, not in this config", unexpected, lambda k: saved[k]),
        ("different shape/dtype (checkpoint -> config)", changed,
         lambda k: f"{saved[k]} -> {wanted[k]}")):
      if keys:
        shown = "\n".join(f"    {k}: {show(k)}" for k in keys[:8])
        more = f"\n    ... and {len(keys) - 8} more" if len(keys) > 8 else ""
        lines.append(f"  {len(keys)} array(s) {title}:\n{shown}{more}")
    raise WorkdirError(
        f"The checkpoint at step {step} in {self.directory} was written by a different "
        f"model or optimizer:\n" + "\n".join(lines) +
        "\nUse the config it was trained with, or another workdir.")

  def restore_latest(self, abstract_state: Any
                     ) -> tuple[int, Any, dict[str, Any] | None] | None:
    """``(step, state, data_position)`` of the newest readable checkpoint, or None
    if there is none. Unreadable ones are skipped with a warning (and, unless
    read-only, moved to ``<workdir>/corrupt_checkpoints/``); a checkpoint of another
    model raises :class:`WorkdirError`, as does having only unreadable ones."""
    steps = self.all_steps()
    failures = []
    for step in reversed(steps):
      try:
        self.check_compatible(step, abstract_state)
        state, position = self.restore(step, abstract_state)
        return step, state, position
      except WorkdirError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        failures.append(f"step {step}: {type(e).__name__}: {str(e)[:300]}")
        logging.warning("Checkpoint at step %d in %s is unreadable (%s: %s); "
                        "falling back to an older one.", step, self.directory,
                        type(e).__name__, str(e)[:300])
        self._set_aside(step)
    if failures:
      raise WorkdirError(
          f"No readable checkpoint in {self.directory}:\n  " + "\n  ".join(failures))
    return None

  def _set_aside(self, step: int) -> None:
    if self.read_only or jax.process_index() != 0:
      return
    src = os.path.join(self.directory, str(step))
    if not os.path.isdir(src):
      return
    dst = os.path.join(self.workdir, CORRUPT_DIR, f"{step}-{int(time.time())}")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.move(src, dst)
    logging.warning("Moved the unreadable checkpoint to %s.", dst)
    self._manager.reload()

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _save_decision_policy(interval: int | None):
  """Every ``interval`` steps (None: never by itself), and on preemption."""
  policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
  if interval is not None:
    policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(interval))
  return ocp.checkpoint_managers.AnySavePolicy(policies)


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'params.head.kernel': ((16, 10), 'float32'), ...}`` of arrays or metadata."""
  return {".".join(_key_name(k) for k in path): (tuple(x.shape), str(x.dtype))
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}
