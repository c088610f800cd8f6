"""Reliability: SIGTERM and kill -9 then resume give exactly the uninterrupted run;
a corrupt latest checkpoint falls back; checkpoints of another model, NaN losses and
bad examples are clear errors."""

from __future__ import annotations

import logging
import os
import re
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, subprocess_env, tiny_config

from sasa_jax import data, training
from sasa_jax.data import pipeline as ip
from sasa_jax.errors import ConfigError, DataError, NonFiniteLossError, WorkdirError
from sasa_jax.workdir.checkpointer import Checkpointer



def _state(workdir, config, step):
  setup = training.Experiment(config, str(workdir))
  ckpt = Checkpointer(str(workdir), read_only=True)
  try:
    return jax.device_get(ckpt.restore_state(step, setup.abstract_state()))
  finally:
    ckpt.close()


def _assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  jax.tree.map(np.testing.assert_array_equal,
               (a.params, a.batch_stats, a.opt_state),
               (b.params, b.batch_stats, b.opt_state))


def _steps(workdir) -> list[int]:
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


@pytest.fixture(scope="session")
def six_steps(tmp_path_factory):
  """A finished 6-step run with checkpoints at 2, 4 and 6. Session-scoped: run once per
  pytest-xdist worker (a module fixture runs again after another module's test there)."""
  config = tiny_config(num_train_steps=6)
  workdir = tmp_path_factory.mktemp("six") / "run"
  summary = training.train_and_evaluate(config, str(workdir))
  return config, workdir, summary


def test_corrupt_latest_checkpoint_falls_back_to_the_newest_valid(six_steps, tmp_path,
                                                                  caplog):
  config, reference, ref_summary = six_steps
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  for root, _, files in os.walk(workdir / "checkpoints" / "6" / "state"):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with caplog.at_level(logging.WARNING):
    summary = training.train_and_evaluate(config, str(workdir))
  damaged = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
  assert len(damaged) == 1 and damaged[0].startswith(
      f"The checkpoint at step 6 in {workdir / 'checkpoints'} is damaged (state/ "
      f"metadata: Expecting value: line 1 column 1"), damaged
  assert f"Moved it to {workdir / 'corrupt_checkpoints'}/6-" in damaged[0]
  assert summary["start_step"] == 4 and summary["step"] == 6
  assert [d.split("-")[0] for d in os.listdir(workdir / "corrupt_checkpoints")] == ["6"]
  _assert_same_state(_state(reference, config, 6), _state(workdir, config, 6))
  assert summary["eval"] == ref_summary["eval"]


def test_checkpoints_of_another_model_are_refused_before_any_step(six_steps, tmp_path):
  config, reference, _ = six_steps
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir)
  os.remove(workdir / "config.json")  # The checkpoints know their config.
  wider = tiny_config(num_train_steps=6, model_overrides={"width": 16})
  with pytest.raises(WorkdirError) as err:
    training.train_and_evaluate(wider, str(workdir))
  message = str(err.value)
  assert f"checkpoint of step 6 in {workdir / 'checkpoints'}" in message
  # Only the field that differs, not the whole dict of overrides.
  assert re.search(r"model_overrides.width: 8 .*16", message), message
  assert "kernel_size" not in message
  assert _steps(workdir) == [2, 4, 6]  # Nothing was trained, moved or deleted.
  with pytest.raises(WorkdirError, match="saved with the checkpoint of step 4"):
    training.evaluate_checkpoint(wider, str(workdir), checkpoint_step=4)

  # Arrays that do not match the model under the same config (its code changed).
  reader = Checkpointer(str(workdir), read_only=True)
  with pytest.raises(WorkdirError) as err:
    reader.check_compatible(6, training.Experiment(wider, str(workdir)).abstract_state())
  reader.close()
  message = str(err.value)
  assert "written by a different model or optimizer" in message
  assert "different shape/dtype (checkpoint -> config)" in message
  assert "params.head.kernel: ((64, 10), 'float32') -> ((128, 10), 'float32')" in message


def test_non_finite_loss_stops_naming_the_step(tmp_path):
  config = tiny_config(base_learning_rate=1e36, warmup_steps=0, num_train_steps=6,
                       checkpoint_every_steps=1, log_every_steps=6)
  with pytest.raises(NonFiniteLossError) as error:
    training.train_and_evaluate(config, str(tmp_path / "run"))
  assert _steps(tmp_path / "run") == [1]  # Step 1 was finite; nothing after it.
  for fact in ("at step 2", "checkpoint (step 1)", "config.base_learning_rate"):
    assert fact in str(error.value)
  with pytest.raises(NonFiniteLossError, match="no checkpoint was written yet"):
    training.train_and_evaluate(tiny_config(base_learning_rate=1e36, warmup_steps=0,
                                            num_train_steps=6, checkpoint_every_steps=5,
                                            log_every_steps=6), str(tmp_path / "other"))


class _Source:
  def __init__(self, examples):
    self.examples = examples

  def __len__(self):
    return len(self.examples)

  def __getitem__(self, i):
    return self.examples[i]


@pytest.mark.parametrize("example,message", [
    ({"image": np.zeros((8, 8, 1), np.uint8), "label": 10},
     "label 10 is out of range: the dataset has 10 classes"),
    ({"image": np.zeros((8, 8, 3), np.uint8), "label": 1},
     r"image has shape \(8, 8, 3\), but the model takes \(8, 8, 1\)"),
    ({"image": np.zeros((6, 8, 1), np.uint8), "label": 1},
     r"image has shape \(6, 8, 1\), but the model takes \(8, 8, 1\)"),
    ({"image": np.zeros((2, 8, 8, 1), np.uint8), "label": 1},
     r"image has shape \(2, 8, 8, 1\) and dtype uint8; expected"),
    ({"image": np.zeros((8, 8, 1), np.float32), "label": 1}, "dtype float32"),
    ({"image": np.zeros((8, 8, 1), np.uint8), "label": 1.5}, "not an integer"),
])
def test_bad_examples_are_clear_errors(example, message):
  config = tiny_config(batch_size=2, eval_batch_size=2)
  info = data.DatasetInfo("bad", num_classes=10, num_train_examples=2,
                              num_eval_examples=2, num_channels=1)
  good = {"image": np.zeros((8, 8, 1), np.uint8), "label": 0}
  source = _Source([good, example])
  with pytest.raises(DataError, match=message):
    next(ip.train_iterator(source, config, info=info))
  with pytest.raises(DataError, match=message):
    list(ip.eval_iterator(source, config, info=info))


def test_empty_split_is_a_clear_error(monkeypatch):
  real = data.Dataset._open
  monkeypatch.setattr(data.Dataset, "_open", lambda self, split: (
      _Source([]) if split == "test" else real(self, split)))
  with pytest.raises(ConfigError, match="'test' has 0.*must be non-empty"):
    data.open_dataset(tiny_config()).info


def _train_py(workdir, num_steps):
  args = [sys.executable, str(REPO / "train.py"), f"--workdir={workdir}",
          "--config.model_overrides.width=8", "--config.batch_size=16",
          "--config.eval_batch_size=120", "--config.warmup_steps=1",
          f"--config.num_train_steps={num_steps}", "--config.log_every_steps=10",
          f"--config.eval_every_steps={num_steps}",
          "--config.checkpoint_every_steps=10"]
  return subprocess.Popen(args, cwd=REPO, env=subprocess_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint_after(workdir, step, proc, timeout=240.0):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if any(s > step for s in _steps(workdir)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"train.py exited early:\n{proc.stderr.read()[-3000:]}")
    time.sleep(0.02)
  proc.kill()
  raise AssertionError("no checkpoint appeared in time")


def _stop(workdir, num_steps, signum, after_step: int) -> int:
  """Runs train.py until a checkpoint after ``after_step`` appears, sends ``signum``, and
  checks that the run saved a checkpoint after the current step and said so in one line;
  returns that step."""
  proc = _train_py(workdir, num_steps)
  _wait_for_checkpoint_after(workdir, after_step, proc)
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err[-3000:]
  assert "Traceback" not in err, err[-3000:]
  name = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}[signum]
  stopped = re.search(rf"train.py: Stopped by {re.escape(name)} after step (\d+), saved a "
                      r"checkpoint", err)
  assert stopped, err[-3000:]
  stopped_at = int(stopped[1])
  assert after_step < stopped_at < num_steps and _steps(workdir)[-1] == stopped_at
  return stopped_at


@pytest.mark.slow
def test_ctrl_c_sigterm_and_kill_9_then_resume_equal_the_uninterrupted_run(tmp_path):
  num_steps = 80
  config = tiny_config(num_train_steps=num_steps, log_every_steps=10,
                       eval_every_steps=num_steps, checkpoint_every_steps=10)
  workdir = tmp_path / "interrupted"

  # Ctrl-C, then SIGTERM: each checkpoints after the current step and exits (130, 143).
  stopped_at = _stop(workdir, num_steps, signal.SIGINT, 0)
  stopped_at = _stop(workdir, num_steps, signal.SIGTERM, stopped_at)

  # kill -9 at an arbitrary moment (possibly in the middle of a save).
  proc = _train_py(workdir, num_steps)
  _wait_for_checkpoint_after(workdir, stopped_at, proc)
  time.sleep(random.uniform(0.0, 0.3))
  proc.kill()
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL

  resumed = training.train_and_evaluate(config, str(workdir))
  assert stopped_at < resumed["start_step"] < num_steps
  reference = training.train_and_evaluate(config, str(tmp_path / "reference"))
  _assert_same_state(_state(tmp_path / "reference", config, num_steps),
                     _state(workdir, config, num_steps))
  assert resumed["eval"] == reference["eval"]
