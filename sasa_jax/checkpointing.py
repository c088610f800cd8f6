"""The workdir: Orbax checkpoints that carry their run's config and their arrays'
checksums, and the checks that keep a workdir to one run.

Layout of a workdir::

    <workdir>/config.json              the run's config (a record for people, never read)
    <workdir>/lock                     held by the run in progress (pid, host, command)
    <workdir>/checkpoints/<step>/      Orbax: 'state' (TrainState), 'data_iterator'
                                       (the input's position), 'config' (the run's
                                       config), 'checksums' (one per array of 'state')
    <workdir>/corrupt_checkpoints/     damaged checkpoints, moved aside (never deleted)
    <workdir>/tensorboard/             event files
    <workdir>/evaluation.json          written by `train.py --mode=evaluate`

Each checkpoint holds the complete train state (step, parameters, BatchNorm
statistics, optimizer state, EMA), the input pipeline's position and the config of the
run that saved it, so a resumed run continues exactly where the saved one was and is
checked against the config it was saved with. Saves are atomic (Orbax writes a
temporary directory and renames it), so a run killed at any moment leaves only
complete checkpoints. A checkpoint that cannot be read back as it was saved (a file
missing or unreadable, or an array whose values no longer match its checksum) is
moved to ``<workdir>/corrupt_checkpoints/`` and the newest intact one is used instead.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sasa_jax import checksums
from sasa_jax import config_validation
from sasa_jax import workdir_lock
from sasa_jax.errors import (CheckpointSaveError, CorruptCheckpointError, Error,
                             TrainingInterrupted, WorkdirError)

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
CORRUPT_DIR = "corrupt_checkpoints"
TENSORBOARD_DIR = "tensorboard"
EVALUATION_FILE = "evaluation.json"

# What only a run's workdir holds.
_RUN_ENTRIES = {CONFIG_FILE, CHECKPOINT_DIR, CORRUPT_DIR, workdir_lock.LOCK_FILE}


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
        f"workdir={workdir!r} is not empty and holds no sasa_jax run (no "
        f"{CONFIG_FILE} nor {CHECKPOINT_DIR}/; found: {shown}). Choose a new or "
        f"empty directory, or the workdir of an earlier run to resume it.")


def save_config(workdir: str, config) -> None:
  """Writes ``config.json`` (process 0), atomically: the run's config, for people
  (checks use the config saved in each checkpoint)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, CONFIG_FILE), config_validation.config_to_dict(config),
             sort_keys=True)


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


def check_config_matches(saved: Mapping[str, Any], config, source: str) -> None:
  """Compares ``config`` with ``saved``, the config saved with a checkpoint.

  Keys that only steer the loop (:data:`config_validation.RUN_CONTROL_KEYS`, e.g.
  ``num_train_steps`` or ``eval_every_steps``) may change: a warning lists them.
  Any other difference means the checkpoint belongs to another experiment, and
  raises :class:`WorkdirError` listing the differing keys. ``source`` names the
  checkpoint in the messages.
  """
  diffs = config_validation.config_differences(
      saved, config_validation.config_to_dict(config))
  fatal = {k: v for k, v in diffs.items()
           if k not in config_validation.RUN_CONTROL_KEYS}
  if fatal:
    lines = "\n".join(f"  {k}: saved={a!r}, now={b!r}" for k, (a, b) in fatal.items())
    raise WorkdirError(
        f"This config differs from the one saved with {source}:\n{lines}\n"
        f"Resume it with the same config (or omit --config with --mode=evaluate), "
        f"or use another workdir.")
  if diffs:
    logging.warning("Resuming %s with changed settings: %s", source, ", ".join(
        f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items()))


def describe_error(error: BaseException) -> str:
  """The innermost cause of ``error`` in one line, without the TensorStore spec that
  Orbax's and TensorStore's messages append (hundreds of lines); an operating-system
  error inside a TensorStore message as ``'<strerror> (<file>)'``."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  os_error = re.search(r"os_error_code='?(\d+)", text)
  text = text.split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
  if os_error:
    files = re.findall(r'"(/[^"]+)"', text)
    return os.strerror(int(os_error[1])) + (f" ({files[-1]})" if files else "")
  line = (text.strip().splitlines() or [type(error).__name__])[0].rstrip(".")
  return line if len(line) <= 500 else line[:500] + " ..."


class Checkpointer:
  """An Orbax ``CheckpointManager`` for the train state, the data position, the config
  and the state's checksums.

  ``should_save(step)`` is Orbax's decision: every ``save_interval_steps``, and at a
  preemption sync point of a multi-process run (``reached_preemption``). A failed
  asynchronous save raises :class:`CheckpointSaveError` from the next
  ``check_saved()`` (cheap: call it every step), ``save``, ``wait_until_finished`` or
  ``close``. Every restore verifies the arrays against their checksums, and any part
  of a checkpoint that cannot be read raises :class:`CorruptCheckpointError` naming it.
  """

  def __init__(self, workdir: str, *, max_to_keep: int = 3,
               save_interval_steps: int | None = None,
               async_checkpointing: bool = True, read_only: bool = False):
    self.directory = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
    self.corrupt_directory = os.path.abspath(os.path.join(workdir, CORRUPT_DIR))
    self.read_only = read_only
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None if read_only else max_to_keep,
        enable_async_checkpointing=async_checkpointing,
        create=not read_only,
        # Leftovers of a save that was killed half-way.
        cleanup_tmp_directories=not read_only,
        save_decision_policy=_save_decision_policy(save_interval_steps),
    )
    self._state_handler = ocp.StandardCheckpointHandler()
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": self._state_handler,
                       "data_iterator": ocp.JsonCheckpointHandler(),
                       "config": ocp.JsonCheckpointHandler(),
                       "checksums": ocp.JsonCheckpointHandler()})
    self._saving: int | None = None  # The step of the save in flight, if any.
    _drop_reports_of_abandoned_reads()

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

  # -------------------------------------------------------------------------
  # Saving.

  def save(self, step: int, state: Any, data_position: dict[str, Any], config) -> None:
    """Saves (asynchronously when enabled) ``state``, the data position, ``config``
    and a checksum of every array of ``state`` (computed on its devices). Raises
    :class:`CheckpointSaveError` if this save, or the one before, failed."""
    self.wait_until_finished()
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data_iterator=ocp.args.JsonSave(data_position),
              config=ocp.args.JsonSave(config_validation.config_to_dict(config)),
              checksums=ocp.args.JsonSave(_named_checksums(state)),
          ),
          force=True,
      )
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e
    self._saving = step

  def check_saved(self) -> None:
    """Raises :class:`CheckpointSaveError` if the save in flight has failed."""
    if self._saving is not None and not self._manager.is_saving_in_progress():
      self.wait_until_finished()

  def wait_until_finished(self) -> None:
    """Waits for the save in flight; raises :class:`CheckpointSaveError` if it failed."""
    step, self._saving = self._saving, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e

  def _save_failed(self, step: int | None, error: Exception) -> CheckpointSaveError:
    kept = [s for s in self.all_steps() if s != step]
    last = (f"the last complete checkpoint (step {kept[-1]}) is kept" if kept
            else "there is no complete checkpoint yet")
    return CheckpointSaveError(
        f"Saving the checkpoint of step {step} in {self.directory} failed: "
        f"{describe_error(error)}. The run stopped; {last}. Fix the cause (e.g. free "
        f"disk space, make the workdir writable), then re-run the same command to "
        f"resume.")

  # -------------------------------------------------------------------------
  # Restoring.

  def saved_config(self, step: int) -> dict[str, Any]:
    """The config saved with checkpoint ``step``, as a plain dict."""
    return self._restore_item(step, "config", ocp.args.JsonRestore())

  def newest_config(self) -> dict[str, Any] | None:
    """The config saved with the newest checkpoint whose config can be read."""
    for step in reversed(self.all_steps()):
      with contextlib.suppress(CorruptCheckpointError):
        return self.saved_config(step)
    return None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """The state (shaped and sharded like ``abstract_state``, verified against its
    checksums) and the data position of checkpoint ``step``."""
    state = self.restore_state(step, abstract_state)
    return state, self._restore_item(step, "data_iterator", ocp.args.JsonRestore())

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Only the train state (for evaluation), verified against its checksums."""
    state = self._restore_item(step, "state", ocp.args.StandardRestore(abstract_state))
    saved = self._restore_item(step, "checksums", ocp.args.JsonRestore())
    changed = checksums.mismatches(saved, _named_checksums(state))
    if changed:
      shown = ", ".join(changed[:4]) + (f" and {len(changed) - 4} more"
                                        if len(changed) > 4 else "")
      raise self._damaged(step, f"state/: the values of {shown} differ from the "
                                f"checksums saved with them")
    return state

  def restore_checked(self, step: int, abstract_state: Any, config
                      ) -> tuple[Any, dict[str, Any]]:
    """``restore(step, abstract_state)`` after checking that checkpoint ``step``
    belongs to ``config``'s run: its saved config (:func:`check_config_matches`), then
    its arrays' names and shapes (:meth:`check_compatible`), both
    :class:`WorkdirError`\\ s. A damaged checkpoint raises
    :class:`CorruptCheckpointError` instead."""
    check_config_matches(self.saved_config(step), config,
                         f"the checkpoint of step {step} in {self.directory}")
    self.check_compatible(step, abstract_state)
    return self.restore(step, abstract_state)

  def restore_latest(self, abstract_state: Any, config
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """``(step, state, data_position)`` of the newest intact checkpoint of
    ``config``'s run (:meth:`restore_checked`), or None if there is none. Each damaged
    one on the way gets one warning naming the step, the part and the cause, and,
    unless read-only, is moved to ``<workdir>/corrupt_checkpoints/``."""
    for step in reversed(self.all_steps()):
      try:
        return (step, *self.restore_checked(step, abstract_state, config))
      except CorruptCheckpointError as e:
        self._set_aside(step, e)
    return None

  def set_aside(self) -> list[str]:
    """The damaged checkpoints moved to ``corrupt_directory`` (by any run), as
    ``<step>-<unix time>`` names."""
    if not os.path.isdir(self.corrupt_directory):
      return []
    return sorted(os.listdir(self.corrupt_directory),
                  key=lambda name: [int(p) for p in name.split("-") if p.isdigit()])

  def check_compatible(self, step: int, abstract_state: Any) -> None:
    """Raises :class:`WorkdirError` listing the arrays whose names or shapes differ
    between checkpoint ``step`` and ``abstract_state`` (another model or optimizer);
    :class:`CorruptCheckpointError` if the checkpoint's metadata cannot be read."""
    with self._reading(step, "state/ metadata"):
      saved = _flat_shapes(self._state_handler.metadata(
          epath.Path(self.directory) / str(step) / "state"))
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

  def _restore_item(self, step: int, name: str, args: ocp.args.CheckpointArgs) -> Any:
    with self._reading(step, f"{name}/"):
      return self._manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]

  @contextlib.contextmanager
  def _reading(self, step: int, part: str):
    """Turns any failure to read ``part`` of checkpoint ``step`` into a
    :class:`CorruptCheckpointError` naming it and the cause."""
    try:
      yield
    except Error:
      raise
    except Exception as e:  # pylint: disable=broad-except
      _raise_interruption(e)
      raise self._damaged(step, f"{part}: {describe_error(e)}") from e

  def _damaged(self, step: int, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"The checkpoint at step {step} in {self.directory} is damaged ({detail}).")

  def _set_aside(self, step: int, error: CorruptCheckpointError) -> None:
    if self.read_only or jax.process_index() != 0:
      logging.warning("%s Skipping it.", error)
      return
    destination = os.path.join(self.corrupt_directory, f"{step}-{int(time.time())}")
    os.makedirs(self.corrupt_directory, exist_ok=True)
    shutil.move(os.path.join(self.directory, str(step)), destination)
    logging.warning("%s Moved it to %s.", error, destination)
    self._manager.reload()

  def close(self) -> None:
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _raise_interruption(error: BaseException) -> None:
  """Re-raises a Ctrl-C or SIGTERM that Orbax wrapped in its own exception while
  reading: that is no damage."""
  cause = error
  while cause is not None:
    if isinstance(cause, (KeyboardInterrupt, TrainingInterrupted)):
      raise cause
    cause = cause.__cause__ or cause.__context__


_dropping_abandoned_reads = False


def _drop_reports_of_abandoned_reads() -> None:
  """Keeps Orbax's abandoned reads of a damaged checkpoint off the console, for good.

  When one array fails to read, Orbax stops waiting for the others and closes its
  event loop: their coroutines, closed at garbage collection, and TensorStore's reads
  completing later (on the closed loop) print dozens of "Exception ignored in ..."
  tracebacks ("Event loop is closed"), at any time afterwards. Installed by the first
  ``Checkpointer``; every other unraisable exception still reaches the hook before.
  """
  global _dropping_abandoned_reads
  if _dropping_abandoned_reads:
    return
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if not _abandoned_read(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  _dropping_abandoned_reads = True


def _abandoned_read(unraisable) -> bool:
  if inspect.iscoroutine(unraisable.object):
    return f"{os.sep}orbax{os.sep}" in unraisable.object.cr_code.co_filename
  return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed")


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


def _flat(tree: Any) -> dict[str, Any]:
  """``{'params.head.kernel': leaf, ...}``: the leaves of ``tree`` by their path."""
  return {".".join(_key_name(k) for k in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'params.head.kernel': ((16, 10), 'float32'), ...}`` of arrays or metadata."""
  return {k: (tuple(x.shape), str(x.dtype)) for k, x in _flat(tree).items()}


def _named_checksums(tree: Any) -> dict[str, int]:
  """``{'params.head.kernel': <uint32 checksum>, ...}`` of the arrays of ``tree``."""
  flat = _flat(tree)
  return dict(zip(flat, checksums.leaf_checksums(list(flat.values()))))
