"""The pieces behind a workdir's integrity: array checksums, the workdir lock, and the
one-line description of a storage error."""

from __future__ import annotations

import errno
import fcntl
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sasa_jax.errors import WorkdirError
from sasa_jax.workdir import checksums, orbax_errors
from sasa_jax.workdir import lock as workdir_lock

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
