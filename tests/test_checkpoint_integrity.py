"""The pieces behind a workdir's integrity: array checksums, the workdir lock, reading
beside a run in progress, and the one-line description of a storage error."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from sasa_jax.errors import WorkdirError
from sasa_jax.workdir import checksums, orbax_errors
from sasa_jax.workdir import lock as workdir_lock
from sasa_jax.workdir import signals
from sasa_jax.workdir.checkpointer import Checkpointer

DTYPES = [np.float32, jnp.bfloat16, np.int32, np.uint8, np.bool_]


def _array(dtype, shape=(5, 7)):
  rng = np.random.default_rng(0)
  if dtype == np.bool_:
    return rng.random(shape) > 0.5
  return rng.integers(0, 100, shape).astype(dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_changing_any_one_element_changes_only_its_arrays_checksum(dtype):
  x, y = _array(dtype), _array(np.float32, (3,))
  before = checksums.leaf_checksums([x, y])
  assert before == checksums.leaf_checksums([x.copy(), y.copy()])  # Deterministic.
  bits = np.frombuffer(np.ascontiguousarray(x).tobytes(), np.uint8).copy()
  for byte in range(0, bits.size, 3):  # Flip one bit in every third byte, one at a time.
    changed = bits.copy()
    changed[byte] ^= 1 << (byte % 8)
    if dtype == np.bool_:  # Booleans hold one bit; any other byte value is not a bool.
      changed[byte] = 1 - bits[byte]
    after = checksums.leaf_checksums(
        [np.frombuffer(changed.tobytes(), x.dtype).reshape(x.shape), y])
    assert after[0] != before[0] and after[1] == before[1], byte


def test_moved_values_change_the_checksum():
  x = np.arange(12, dtype=np.float32).reshape(3, 4)
  reference = checksums.leaf_checksums([x])
  assert checksums.leaf_checksums([x[::-1]]) != reference  # Rows swapped.
  assert checksums.leaf_checksums([x.reshape(4, 3)]) == reference  # Same bytes.
  assert checksums.leaf_checksums([x.T.copy()]) != reference
  # Arrays of one shape are checksummed together, each keeps its own.
  together = checksums.leaf_checksums([x, x + 1, np.float32(2), x * 2])
  assert together[0] == reference[0] and len(set(together)) == 4
  assert checksums.leaf_checksums([x * 2, np.float32(2), x + 1, x]) == together[::-1]
  assert checksums.mismatches({"a": 1, "b": 2}, {"a": 1, "b": 3, "c": 4}) == ["b", "c"]


def test_a_second_holder_of_the_workdir_lock_is_refused_naming_the_first(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirError, match=rf"in use by another run: pid {os.getpid()} "
                       r"on host .* holds .*lock. Wait for that run to end"):
      workdir_lock.WorkdirLock(str(tmp_path)).__enter__()
  with workdir_lock.WorkdirLock(str(tmp_path)):  # Released on exit.
    pass


def test_a_filesystem_without_locks_runs_unlocked_with_a_warning(tmp_path, monkeypatch,
                                                                 caplog):
  def no_locks(fd, operation):
    raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

  monkeypatch.setattr(fcntl, "flock", no_locks)
  with caplog.at_level(logging.WARNING), workdir_lock.WorkdirLock(str(tmp_path)):
    pass
  assert "Cannot lock" in caplog.text and "would not be stopped" in caplog.text


def test_storage_errors_in_one_line():
  full = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "params.w/0" in OCDBT database at local file '
      '"/w/checkpoints/40.orbax-checkpoint-tmp/state/": Failed writing: "/w/checkpoints/'
      '40.orbax-checkpoint-tmp/state/d/94c0": Failed to write 25484 bytes to file 8: No '
      "space left on device [os_error_code='28']")
  wrapped = Exception("Encountered error while reading array index: (slice(0, 2, 1),). "
                      "See full TensorStore details: <bound method spec of TensorStore({"
                      "\n  'base': {...")
  wrapped.__cause__ = full
  assert orbax_errors.describe_error(wrapped) == (
      "No space left on device (/w/checkpoints/40.orbax-checkpoint-tmp/state/d/94c0)")
  assert orbax_errors.describe_error(KeyError('Item "config" was not found.')) == (
      'Item "config" was not found')


def test_a_checkpoint_removed_while_it_is_read_is_not_damaged(tmp_path, caplog):
  """An evaluation beside a run in progress: the run removes its oldest checkpoint
  (max_to_keep) while the reader reads it. The reader takes the newest one that exists,
  calls nothing damaged and moves nothing."""
  config = tiny_config()
  with Checkpointer(str(tmp_path), async_checkpointing=False) as writer:
    for step in (2, 4, 6):
      writer.save(step, {"w": jnp.full(3, step, jnp.float32)},
                  {"next_batch": step}, config)
  reader = Checkpointer(str(tmp_path), read_only=True)
  read = reader.restore_checked

  def rotated_while_read(step, *args):
    if step == 6:  # The run saves step 8 and removes 6 (keeping 4 and 8, say) ...
      shutil.rmtree(tmp_path / "checkpoints" / "6")
      shutil.rmtree(tmp_path / "checkpoints" / "4")
    return read(step, *args)

  reader.restore_checked = rotated_while_read
  abstract = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
  with caplog.at_level(logging.INFO):
    step, state, _ = reader.restore_latest(abstract, lambda saved, source: None)
  reader.close()
  assert step == 2 and state["w"].tolist() == [2.0] * 3
  assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
  assert "removed while it was read" in caplog.text
  assert not (tmp_path / "corrupt_checkpoints").exists()


def test_the_newest_config_is_read_again_when_its_checkpoint_is_removed(tmp_path):
  """``--mode=evaluate`` without --config beside a run that keeps one checkpoint: the
  run replaces the checkpoint whose config the reader was reading. The reader lists the
  checkpoints again and reads the new one's config."""
  with Checkpointer(str(tmp_path), async_checkpointing=False) as writer:
    writer.save(2, {"w": jnp.zeros(3)}, {"next_batch": 2}, tiny_config(seed=2))
  reader = Checkpointer(str(tmp_path), read_only=True)
  read = reader.saved_config

  def replaced_while_read(step):
    if step == 2:  # The run saves step 4 and removes 2 (max_to_keep=1).
      with Checkpointer(str(tmp_path), async_checkpointing=False) as writer:
        writer.save(4, {"w": jnp.zeros(3)}, {"next_batch": 4}, tiny_config(seed=4))
      shutil.rmtree(tmp_path / "checkpoints" / "2")
    return read(step)

  reader.saved_config = replaced_while_read
  saved = reader.newest_config()
  reader.close()
  assert saved is not None and saved["seed"] == 4


def test_ctrl_c_stops_after_the_step_and_a_second_one_at_once(capfd):
  # What was there before (Python's default, or SIG_IGN in a process started in the
  # background by a shell) is put back afterwards.
  before = signal.getsignal(signal.SIGINT)
  stop = signals.StopOnSignals(num_processes=1)
  with stop:
    stop.training_started(checkpointer=object())
    assert not stop.requested(3)
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # The handler runs here.
    assert stop.requested(3) and stop.received == signal.SIGINT
    assert "stopping after the current step" in capfd.readouterr().err
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  assert signal.getsignal(signal.SIGINT) is before

