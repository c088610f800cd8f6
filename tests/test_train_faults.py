"""Faults and mistakes as users meet them, with `train.py` in real processes: damaged
checkpoints, two runs on one workdir, a changed config without config.json, every
checkpoint damaged, SIGTERM while starting, a full and a read-only disk. Each ends
with one clear warning per damaged checkpoint and the uninterrupted run's result, or
with one `train.py: error:` line and nothing lost."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import tensorstore as ts
from conftest import REPO, run_train_py, subprocess_env


NUM_STEPS = 8
# 8 steps of a narrower sasa_tiny, checkpoints at 2, 4, 6 and 8 (all kept).
TINY = ("--config.model_overrides.width=8", "--config.batch_size=16",
        "--config.eval_batch_size=120", "--config.warmup_steps=1",
        "--config.log_every_steps=4", f"--config.eval_every_steps={NUM_STEPS}",
        "--config.checkpoint_every_steps=2", "--config.max_to_keep=4",
        f"--config.num_train_steps={NUM_STEPS}")


def _train_py(workdir, *args, **kwargs) -> subprocess.CompletedProcess:
  return run_train_py(*TINY, f"--workdir={workdir}", *args, **kwargs)


def _ok(result) -> str:
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  return result.stdout + result.stderr


def _failed(result) -> str:
  """The one `train.py: error:` message (possibly several lines) that ends stderr."""
  assert result.returncode == 1, (result.stdout + result.stderr)[-3000:]
  assert result.stderr.count("train.py: error: ") == 1, result.stderr[-3000:]
  _assert_quiet(result.stderr)
  return result.stderr.split("train.py: error: ")[1]


def _assert_quiet(stderr: str) -> None:
  for noise in ("Traceback", "Exception ignored", "Event loop is closed", "TensorStore({"):
    assert noise not in stderr, stderr[-3000:]


def _warnings(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if re.match(r"W\d{4} ", line)]


def _steps(workdir) -> list[str]:
  return sorted(os.listdir(workdir / "checkpoints"), key=lambda s: (len(s), s))


def _checksums(workdir, step: int) -> dict[str, int]:
  """The checksums saved with a checkpoint: equal for bit-identical states."""
  with open(workdir / "checkpoints" / str(step) / "checksums" / "metadata") as f:
    return json.load(f)


def _eval_line(output: str) -> str:
  return re.search(rf"\[step {NUM_STEPS}\] eval .*", output)[0]


def _array_files(workdir, step: int) -> list[str]:
  return sorted(glob.glob(str(workdir / "checkpoints" / str(step) / "state" /
                              "ocdbt.process_0" / "d" / "*")), key=os.path.getsize)


def _change_values_of(workdir, step: int, name: str) -> None:
  """Adds 0.25 to one value of array ``name`` in checkpoint ``step``, through the
  storage layer (TensorStore's zarr arrays in OCDBT, as Orbax writes them): the files
  read back without any error, with the wrong value. (Bytes overwritten on disk do this
  where a value is stored uncompressed outside OCDBT's checksummed b-tree nodes.)"""
  array = ts.open({"driver": "zarr", "path": name, "kvstore": {
      "driver": "ocdbt",
      "base": f"file://{workdir / 'checkpoints' / str(step) / 'state'}/"}}).result()
  values = array.read().result()
  values.flat[values.size // 2] += 0.25
  array.write(values).result()


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """An uninterrupted run: its workdir and its output. Session-scoped: run once per
  pytest-xdist worker (a module fixture runs again after another module's test there)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  out = _ok(_train_py(workdir))
  assert _steps(workdir) == ["2", "4", "6", "8"]
  return workdir, out


def _copy(reference, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(reference[0], workdir)
  return workdir


@pytest.mark.slow
def test_damaged_checkpoints_fall_back_with_one_warning_each(reference, tmp_path):
  """Values of an array changed on disk (restored silently before checksums), the
  metadata of the state missing (once "another model"), array files truncated: each
  is one warning, moved aside, and the run ends as the uninterrupted one did."""
  workdir = _copy(reference, tmp_path)
  assert (workdir / "lock").exists()  # Left by the finished run: no stale lock.
  _change_values_of(workdir, 8, "params.head.kernel")
  os.remove(workdir / "checkpoints" / "6" / "state" / "_METADATA")
  for path in _array_files(workdir, 4):
    os.truncate(path, 10)
  (workdir / "config.json").write_text("{not json")  # A record, never read.

  result = _train_py(workdir)
  out = _ok(result)
  _assert_quiet(result.stderr)
  warnings = _warnings(result.stderr)
  assert len(warnings) == 3, warnings
  causes = {8: r"state/: the values of params\.head\.kernel differ from the "
               r"checksums saved with them",
            6: r"state/ metadata: Metadata file \(named _METADATA\) does not exist at "
               + re.escape(str(workdir / "checkpoints" / "6" / "state")),
            4: r'state/( metadata)?: [A-Z_]+: .*"'
               + re.escape(str(workdir / "checkpoints" / "4" / "state"))}
  for warning, (step, cause) in zip(warnings, causes.items()):
    assert re.search(
        rf"The checkpoint at step {step} in {re.escape(str(workdir / 'checkpoints'))} "
        rf"is damaged \({cause}.*\)\. Moved it to "
        rf"{re.escape(str(workdir / 'corrupt_checkpoints'))}/{step}-\d+\.$", warning), warning
  assert "Resuming from" in out and "at step 2." in out
  assert sorted(int(d.split("-")[0]) for d in
                os.listdir(workdir / "corrupt_checkpoints")) == [4, 6, 8]
  assert _checksums(workdir, 8) == _checksums(reference[0], 8)
  assert _eval_line(out) == _eval_line(reference[1])
  assert json.loads((workdir / "config.json").read_text())["max_to_keep"] == 4


@pytest.mark.slow
def test_a_second_run_on_a_workdir_stops_at_once_naming_the_first(
    reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  args = (sys.executable, str(REPO / "train.py"), *TINY, f"--workdir={workdir}",
          f"--config.num_train_steps={NUM_STEPS + 2}")
  env = subprocess_env()
  first = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    while f'"pid": {first.pid},' not in (workdir / "lock").read_text():
      assert first.poll() is None and time.monotonic() < deadline, "no lock taken"
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # Alive, holding the lock, doing nothing.
    second = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300, check=False)
  finally:
    first.send_signal(signal.SIGCONT)
  message = _failed(second)
  assert message.startswith(f"workdir='{workdir}' is in use by another run: pid "
                            f"{first.pid} on host "), message
  assert "Wait for that run to end (or stop it), or use another workdir." in message
  assert "Training sasa_tiny" not in second.stderr  # It stopped before restoring.
  out, err = first.communicate(timeout=300)
  assert first.returncode == 0, err[-3000:]
  assert _steps(workdir) == ["4", "6", "8", "10"]  # No leftover temporary directory.


@pytest.mark.slow
def test_a_changed_config_is_refused_by_the_checkpoints_without_config_json(
    reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  os.remove(workdir / "config.json")
  result = _train_py(workdir, "--config.base_learning_rate=2.0")
  message = _failed(result)
  assert f"step 8 in {workdir / 'checkpoints'}" in message
  assert re.search(r"base_learning_rate: 0.4 .*2.0", message), message
  assert not (workdir / "config.json").exists()  # Nothing was written.
  assert _checksums(workdir, 8) == _checksums(reference[0], 8)


@pytest.mark.slow
def test_a_workdir_whose_checkpoints_were_all_damaged_restarts_only_when_asked(
    reference, tmp_path):
  workdir = _copy(reference, tmp_path)
  for step in (2, 4, 6, 8):
    for path in _array_files(workdir, step):
      os.truncate(path, 10)
  first = _train_py(workdir)
  message = _failed(first)
  assert len(_warnings(first.stderr)) == 4
  corrupt = workdir / "corrupt_checkpoints"
  assert message.startswith(
      f"workdir='{workdir}' has no intact checkpoint: the damaged ones (2-"), message
  assert f"were moved to {corrupt}. Pass --restart_from_scratch" in message
  assert _steps(workdir) == [] and len(os.listdir(corrupt)) == 4

  again = _train_py(workdir)  # Not silently from 0.
  assert _failed(again) == message and not _warnings(again.stderr)

  out = _ok(_train_py(workdir, "--restart_from_scratch"))
  assert "steps 0 -> 8" in out and len(os.listdir(corrupt)) == 4
  assert _checksums(workdir, 8) == _checksums(reference[0], 8)
  assert _eval_line(out) == _eval_line(reference[1])


@pytest.mark.slow
def test_evaluating_a_run_in_progress(tmp_path):
  """--mode=evaluate beside a run that saves and removes a checkpoint every 2 steps
  evaluates one that exists, and calls none damaged."""
  workdir = tmp_path / "run"
  training = subprocess.Popen(
      [sys.executable, str(REPO / "train.py"), *TINY, f"--workdir={workdir}",
       "--config.num_train_steps=400", "--config.max_to_keep=1",
       "--config.eval_every_steps=400"], cwd=REPO,
      env=subprocess_env(), stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  try:
    while not (workdir / "checkpoints").is_dir() or not _steps(workdir):
      assert training.poll() is None, training.stderr.read()[-3000:]
      time.sleep(0.05)
    evaluation = _train_py(workdir, "--mode=evaluate")
    assert training.poll() is None  # It evaluated while the run trained.
  finally:
    training.kill()
    training.communicate()
  out = _ok(evaluation)
  assert "damaged" not in out and "Wrote" in out, out[-3000:]
  assert not (workdir / "corrupt_checkpoints").exists()


@pytest.mark.parametrize("signum, name", [(signal.SIGTERM, "SIGTERM"),
                                          (signal.SIGINT, "Ctrl-C (SIGINT)")])
def test_a_signal_while_starting_says_so(tmp_path, signum, name):
  proc = subprocess.Popen(
      [sys.executable, str(REPO / "train.py"), *TINY, f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:  # Flags parsed; JAX, data and restore still to come.
    if "] Config " in line:
      break
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"train.py: Stopped by {name} while starting"), err[-3000:]
  assert "nothing to save" in last and "Traceback" not in err
  assert not (tmp_path / "run" / "checkpoints").exists()


def _damaged_copy(data_dir, tmp_path, split: str):
  """A copy of the TFDS ``data_dir`` whose ``split`` file has bytes overwritten (at the
  start: a small split's records are there, the rest of the file is padding)."""
  copy = tmp_path / "tfds"
  shutil.copytree(data_dir, copy)
  (path,) = glob.glob(str(copy / "*" / "*" / f"*-{split}.array_record*"))
  damaged = bytearray(open(path, "rb").read())
  for i in range(200, 1200):
    damaged[i] ^= 0x5A
  with open(path, "wb") as f:
    f.write(damaged)
  return copy, path


@pytest.mark.slow
def test_a_failed_evaluation_keeps_the_checkpoint_of_its_step(tiny_tfds_dir, tmp_path):
  """The state a run trained is saved before its evaluation, which then fails on a
  damaged file of the eval split with one line naming the dataset, the split and the
  file; re-running trains nothing again, and says the same."""
  data_dir, damaged = _damaged_copy(tiny_tfds_dir, tmp_path, "test")
  workdir = tmp_path / "run"
  args = ("--config.dataset=sasa_test_digits", f"--config.data_dir={data_dir}",
          "--config.data_download=false", "--config.eval_batch_size=40")
  for attempt in range(2):
    result = _train_py(workdir, *args)
    message = _failed(result)
    for fact in ("'sasa_test_digits'", "split 'test'", damaged,
                 "python -m sasa_jax.data prepare sasa_test_digits"):
      assert fact in message, message
    assert _steps(workdir)[-1] == str(NUM_STEPS), attempt  # Saved before evaluating.
  assert f"Already trained to step {NUM_STEPS}" in result.stderr  # Nothing trained again.


@contextlib.contextmanager
def _small_disk(path, size: str = "4m"):
  """A tmpfs of ``size`` mounted on ``path`` (root only)."""
  os.makedirs(path)
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                          str(path)], capture_output=True, text=True, check=False)
  if mount.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.strip()}")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(disk, leave: int) -> None:
  """Fills ``disk`` but for ``leave`` bytes."""
  stats = os.statvfs(disk)
  with open(disk / "filler", "ab") as f:
    f.write(b"\0" * max(0, stats.f_bavail * stats.f_frsize - leave))


def _remount(disk, mode: str) -> None:
  subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_and_a_read_only_disk_stop_with_one_line_and_lose_nothing(
    reference, tmp_path):
  with _small_disk(tmp_path / "disk") as disk:
    workdir = disk / "run"
    shutil.copytree(reference[0], workdir)
    shutil.rmtree(workdir / "checkpoints" / "8")  # As if stopped after step 6.
    _fill(disk, leave=64 * 1024)  # Room for the lock and logs, not for a checkpoint.

    full = _train_py(workdir)
    message = _failed(full)
    assert re.match(rf"Saving the checkpoint of step 8 in {workdir / 'checkpoints'} "
                    r"failed: No space left on device \(/\S+\)\. The run stopped; the "
                    r"last complete checkpoint \(step 6\) is kept\.", message), message
    assert [s for s in _steps(workdir) if s.isdigit()] == ["2", "4", "6"]

    _fill(disk, leave=0)
    evaluation = _train_py(workdir, "--mode=evaluate")
    assert "[step 6] eval weights: loss" in evaluation.stdout  # Printed, not lost.
    assert _failed(evaluation).startswith(
        f"Could not write {workdir / 'evaluation.json'}: No space left on device.")
    assert not glob.glob(str(workdir / "evaluation.json*"))  # No 0-byte leftover.

    os.remove(disk / "filler")
    _remount(disk, "ro")
    read_only = _train_py(workdir)
    assert _failed(read_only).startswith(f"Read-only file system ({workdir / 'lock'}).")
    evaluation = _train_py(workdir, "--mode=evaluate")
    assert "[step 6] eval weights: loss" in evaluation.stdout
    assert "Read-only file system" in _failed(evaluation)

    _remount(disk, "rw")  # Fixed: the same command resumes from step 6.
    out = _ok(_train_py(workdir))
    assert "at step 6." in out and _steps(workdir) == ["2", "4", "6", "8"]
    assert _checksums(workdir, 8) == _checksums(reference[0], 8)
    assert _eval_line(out) == _eval_line(reference[1])
