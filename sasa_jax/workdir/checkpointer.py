"""Orbax checkpoints of a run, carrying their run's config and their arrays' checksums.

Each checkpoint (``<workdir>/checkpoints/<step>/``) holds the complete train state (step,
parameters, BatchNorm statistics, optimizer state, EMA), the input pipeline's position,
the config of the run that saved it and a checksum of every array of the state, so a
resumed run continues exactly where the saved one was and is checked against the config
it was saved with. Saves are atomic (Orbax writes a temporary directory and renames it),
so a run killed at any moment leaves only complete checkpoints. A checkpoint that cannot
be read back as it was saved (a file missing or unreadable, or an array whose values no
longer match its checksum) is moved to ``<workdir>/corrupt_checkpoints/`` and the newest
intact one is used instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from sasa_jax.config import checks
from sasa_jax.errors import CheckpointSaveError, CorruptCheckpointError, Error, WorkdirError
from sasa_jax.workdir import checksums, layout, orbax_errors

# Raises WorkdirError unless a checkpoint's saved config (a dict) belongs to the run;
# the second argument names the checkpoint.
ConfigCheck = Callable[[Mapping[str, Any], str], None]

# How long a reader waits for a checkpoint that failed to read to disappear (the run in
# progress removing it) before calling it damaged.
_REMOVAL_SECONDS = 2.0


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
    self.directory = os.path.abspath(os.path.join(workdir, layout.CHECKPOINT_DIR))
    self.corrupt_directory = os.path.abspath(os.path.join(workdir, layout.CORRUPT_DIR))
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
    orbax_errors.drop_reports_of_abandoned_reads()

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
              config=ocp.args.JsonSave(checks.config_to_dict(config)),
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
        f"{orbax_errors.describe_error(error)}. The run stopped; {last}. Fix the cause (e.g. free "
        f"disk space, make the workdir writable), then re-run the same command to "
        f"resume.")

  # -------------------------------------------------------------------------
  # Restoring.

  def saved_config(self, step: int) -> dict[str, Any]:
    """The config saved with checkpoint ``step``, as a plain dict."""
    return self._restore_item(step, "config", ocp.args.JsonRestore())

  def newest_config(self) -> dict[str, Any] | None:
    """The config saved with the newest checkpoint whose config can be read (a
    damaged one is skipped; one removed meanwhile, as in :meth:`restore_latest`, is
    not damaged), or None if there is none."""
    found = self._newest_readable(self.saved_config, lambda step, error: None)
    return None if found is None else found[1]

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

  def restore_checked(self, step: int, abstract_state: Any, check_config: ConfigCheck
                      ) -> tuple[Any, dict[str, Any]]:
    """``restore(step, abstract_state)`` after checking that checkpoint ``step``
    belongs to the run: ``check_config(saved config, description of the checkpoint)``,
    then its arrays' names and shapes (:meth:`check_compatible`), both raising
    :class:`WorkdirError`. A damaged checkpoint raises :class:`CorruptCheckpointError`
    instead."""
    check_config(self.saved_config(step), f"the checkpoint of step {step} in "
                                          f"{self.directory}")
    self.check_compatible(step, abstract_state)
    return self.restore(step, abstract_state)

  def restore_latest(self, abstract_state: Any, check_config: ConfigCheck
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """``(step, state, data_position)`` of the newest intact checkpoint of the run
    (:meth:`restore_checked`), or None if there is none. Each damaged one on the way
    gets one warning naming the step, the part and the cause, and, unless read-only, is
    moved to ``<workdir>/corrupt_checkpoints/``. One removed while it is read is not
    damaged (:meth:`_newest_readable`).
    """
    found = self._newest_readable(
        lambda step: self.restore_checked(step, abstract_state, check_config),
        self._move_aside)
    return None if found is None else (found[0], *found[1])

  def _newest_readable(self, read: Callable[[int], Any],
                       on_damaged: Callable[[int, CorruptCheckpointError], None]
                       ) -> tuple[int, Any] | None:
    """``(step, read(step))`` for the newest checkpoint that ``read`` reads without a
    :class:`CorruptCheckpointError`, calling ``on_damaged(step, error)`` for each that
    fails; None if none is left. A checkpoint that disappears while it is read is not
    damaged: the run in progress in this workdir (``max_to_keep``) removed it, and
    saved a newer one, so the list of checkpoints is read again."""
    tried = set()
    while True:
      untried = [s for s in reversed(self.all_steps()) if s not in tried]
      if not untried:
        return None
      step = untried[0]
      tried.add(step)
      try:
        return step, read(step)
      except CorruptCheckpointError as e:
        if not self._removed_meanwhile(step):
          on_damaged(step, e)
          continue
        logging.info("The checkpoint at step %d was removed while it was read (a run in "
                     "progress keeps max_to_keep); reading the newest one.", step)
        self._manager.reload()

  def _removed_meanwhile(self, step: int) -> bool:
    """Whether checkpoint ``step``, which failed to read, is being removed. Only a
    read-only checkpointer shares its workdir with a run in progress (the lock keeps out
    a second writer); it gives that run's deletion a moment to finish."""
    path = os.path.join(self.directory, str(step))
    deadline = time.monotonic() + (_REMOVAL_SECONDS if self.read_only else 0)
    while os.path.isdir(path) and time.monotonic() < deadline:
      time.sleep(0.05)
    return not os.path.isdir(path)

  def moved_aside(self) -> list[str]:
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
      orbax_errors.raise_interruption(e)
      raise self._damaged(step, f"{part}: {orbax_errors.describe_error(e)}") from e

  def _damaged(self, step: int, detail: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"The checkpoint at step {step} in {self.directory} is damaged ({detail}).")

  def _move_aside(self, step: int, error: CorruptCheckpointError) -> None:
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


def _save_decision_policy(interval: int | None):
  """Every ``interval`` steps (None: never by itself), and on preemption."""
  policies = [ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
  if interval is not None:
    policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(interval))
  return ocp.checkpoint_managers.AnySavePolicy(policies)


def _flat(tree: Any) -> dict[str, Any]:
  """``{'params.head.kernel': leaf, ...}``: the leaves of ``tree`` by their path."""
  return {jax.tree_util.keystr(path, simple=True, separator="."): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  """``{'params.head.kernel': ((16, 10), 'float32'), ...}`` of arrays or metadata."""
  return {k: (tuple(x.shape), str(x.dtype)) for k, x in _flat(tree).items()}


def _named_checksums(tree: Any) -> dict[str, int]:
  """``{'params.head.kernel': <uint32 checksum>, ...}`` of the arrays of ``tree``."""
  flat = _flat(tree)
  return dict(zip(flat, checksums.leaf_checksums(list(flat.values()))))
