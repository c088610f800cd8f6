"""``train.py`` as users run it: default workdir, resume, evaluate, bad flags."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from conftest import REPO, run_train_py, subprocess_env

# A few steps of a narrower sasa_tiny, as command-line overrides.
TINY = ("--config.model_overrides.width=8", "--config.batch_size=16",
        "--config.eval_batch_size=120", "--config.warmup_steps=1",
        "--config.log_every_steps=1", "--config.eval_every_steps=2",
        "--config.checkpoint_every_steps=2")


def _ok(result) -> str:
  output = result.stdout + result.stderr
  assert result.returncode == 0, output[-3000:]
  return output


@pytest.mark.slow
def test_train_resume_evaluate_from_the_command_line(tmp_path):
  # No --workdir: ./workdirs/default, and the run says where it wrote. Dilated windows
  # (a model override, as any other).
  dilated = "--config.model_overrides.dilation=2"
  out = _ok(run_train_py(*TINY, dilated, "--config.num_train_steps=2", cwd=tmp_path))
  workdir = tmp_path / "workdirs" / "default"
  assert f"workdir: {workdir}" in out
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  assert (workdir / "config.json").exists()
  assert "] train loss=" in out and "] eval weights: loss" in out

  # The same command with a longer run resumes at the saved step.
  out = _ok(run_train_py(*TINY, dilated, "--config.num_train_steps=4", cwd=tmp_path))
  assert "Resuming from" in out and "at step 2." in out
  assert "steps 2 -> 4" in out
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]

  # Evaluate the latest checkpoint with the config saved in the workdir; the same command
  # line may come along (its values are the saved ones), and an evaluation key applies.
  assert json.loads((workdir / "config.json").read_text())["model_overrides"]["dilation"] == 2
  out = _ok(run_train_py(*TINY, dilated, "--mode=evaluate", f"--workdir={workdir}",
                         "--config.num_eval_steps=2"))
  report = json.loads((workdir / "evaluation.json").read_text())
  assert report["step"] == 4 and report["num_examples"] == 240  # 2 batches of 120.
  assert 0.0 <= report["accuracy"] <= report["top5_accuracy"] <= 1.0
  assert report["loss"] > 0 and "evaluation.json" in out

  # A key that would evaluate another model is refused in one line, naming it; with
  # --config, a config of another run is refused with the advice to leave --config out.
  for args, facts in (
      (("--config.model=resnet_tiny",), ("--config.model='resnet_tiny'", "sasa_tiny")),
      ((f"--config={REPO / 'configs' / 'default.py'}", "--config.model_overrides.width=8",
        "--config.base_learning_rate=0.2"), ("base_learning_rate", "leave out --config"))):
    result = run_train_py("--mode=evaluate", f"--workdir={workdir}", *args)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error = result.stderr.split("train.py: error: ")[1]
    for fact in facts:
      assert fact in error, error


@pytest.mark.parametrize("args,message", [
    (("--config.bach_size=3",), ("unknown config key 'bach_size'", "'batch_size'")),
    (("--config.model_overrides.kernal_size=3",),
     ("unknown config key 'model_overrides.kernal_size'", "'model_overrides.kernel_size'")),
    (("--config.optimizer=adam",), ("config.optimizer='adam'", "'sgd'", "'adamw'")),
    (("--config.batch_size=many",), "--config.batch_size=many"),
    (("--mode=fit",), "value should be one of <train|evaluate>"),
    (("--checkpoint_step=3",), "--checkpoint_step is only used with --mode=evaluate"),
    (("--mode=evaluate", "--restart_from_scratch"),
     "--restart_from_scratch is only used with --mode=train"),
    (("--config={repo}/configs/imagenet.py:resnet99",),
     ("configs/imagenet.py: model must be one of", "'resnet50'", "'resnet99'")),
    (("--config={tmp}/broken.py",), ("broken.py:1:", "invalid syntax")),
    (("--config.image_size=100000",), ("config.image_size=100000", "8x8", "'digits'")),
    # Resized to a size no host can hold (petabytes: beyond any address space, so refused
    # whatever the kernel's overcommit policy).
    pytest.param(("--config.image_size=10000000", "--config.augmentation=inception",
                  "--config.eval_preprocessing=center_crop"),
                 ("Out of host memory", "config.image_size"), marks=pytest.mark.slow),
    (("--config.model_overrides.dilation=2", "--config.model_overrides.borders=shift"),
     ("borders='shift'", "height", "kernel_size * dilation = 5 * 2")),
    (("--mode=evaluate", "--workdir={tmp}"), "holds no checkpoints to evaluate"),
    (("extra",), "unexpected arguments: extra"),
])
def test_bad_flags_are_clear_errors(tmp_path, args, message):
  (tmp_path / "broken.py").write_text("def get_config(:\n  return None\n")
  result = run_train_py(*(a.format(tmp=tmp_path, repo=REPO) for a in args),
                        f"--workdir={tmp_path / 'w'}" if "--workdir" not in
                        " ".join(args) else "--config.seed=0", cwd=tmp_path)
  assert result.returncode != 0
  for fact in (message,) if isinstance(message, str) else message:
    assert fact in result.stderr, result.stderr[-2000:]
  # One line (after absl's log lines, if the run got that far), no help text.
  lines = [line for line in result.stderr.splitlines() if not re.match(r"[IWE]\d{4} ", line)]
  assert len(lines) == 1 and lines[0].startswith("train.py: error: "), result.stderr[-2000:]
  assert not (tmp_path / "w").exists()  # Nothing was created.


def test_traceback_flag_shows_where_an_error_happened(tmp_path):
  plain = run_train_py("--mode=evaluate", f"--workdir={tmp_path}", cwd=tmp_path)
  assert plain.stderr.strip().splitlines()[-1].startswith("train.py: error: workdir=")
  assert "Traceback" not in plain.stderr
  shown = run_train_py("--mode=evaluate", f"--workdir={tmp_path}", "--traceback",
                       cwd=tmp_path)
  assert shown.returncode == 1 and "Traceback (most recent call last)" in shown.stderr
  assert "sasa_jax.errors.WorkdirError: workdir=" in shown.stderr


def _run_in_terminal(args, cwd, columns=120, timeout=300) -> str:
  """Runs ``python train.py ARGS`` with its stdout and stderr on a pseudo-terminal of
  ``columns`` columns (as in a researcher's shell); returns everything it wrote."""
  master, slave = pty.openpty()
  fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))
  proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *args], cwd=cwd,
                          stdin=subprocess.DEVNULL, stdout=slave, stderr=slave,
                          env=subprocess_env(COLUMNS=str(columns)))
  os.close(slave)
  chunks, deadline = [], time.monotonic() + timeout
  while time.monotonic() < deadline:
    ready, _, _ = select.select([master], [], [], 1.0)
    if ready:
      try:
        chunk = os.read(master, 65536)
      except OSError:  # EIO: the child closed the terminal.
        break
      if not chunk:
        break
      chunks.append(chunk)
    elif proc.poll() is not None:
      break
  else:
    proc.kill()
  os.close(master)
  output = b"".join(chunks).decode(errors="replace")
  assert proc.wait(timeout=60) == 0, output[-3000:]
  return output


@pytest.mark.slow
def test_console_in_a_terminal(tmp_path):
  """In a 120-column terminal: the bar shows the step, img/s and the loss; metric and
  log lines are printed above it, never glued onto it; the compile time is reported
  once; a re-run with nothing left to train adds no TensorBoard event file."""
  args = (*TINY, "--config.num_train_steps=6", f"--workdir={tmp_path / 'run'}",
          "--config.model_overrides.borders=shift")  # Neighbourhood attention.
  output = _run_in_terminal(args, tmp_path)
  segments = [s for line in output.split("\n") for s in line.split("\r")]
  bars = [s for s in segments if re.search(r"train +\d+/6 ", s)]
  assert any("img/s=" in s and "loss=" in s for s in bars), bars[-3:]
  for s in bars:  # Whatever follows the bar on its line is only the bar's own redraw.
    assert not re.search(r"\[step \d|[IWEF]\d{4} \d\d:\d\d", s), s
  metric_lines = [s for s in segments if s.startswith("[step ") and "] train loss=" in s]
  assert len(metric_lines) == 6 and all(len(s) <= 120 for s in metric_lines), metric_lines
  assert output.count("(compiling the train step) took") == 1

  events = os.listdir(tmp_path / "run" / "tensorboard")
  again = _run_in_terminal(args, tmp_path)
  assert "Already trained to step 6" in again
  assert os.listdir(tmp_path / "run" / "tensorboard") == events


SHARED_TFDS = REPO.parent / "shared" / "data" / "tfds"


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_TFDS / "fashion_mnist").is_dir(),
                    reason="../shared/data/tfds (real Fashion-MNIST) is not beside the repo")
def test_a_real_tfds_dataset_through_command_line_overrides(tmp_path):
  """``--config.data_dir`` (a None-default key) and the other data keys from the command
  line, on the real Fashion-MNIST as TFDS prepared it, then evaluated."""
  workdir = tmp_path / "run"
  out = _ok(run_train_py(
      *TINY, "--config.dataset=fashion_mnist", "--config.data_dir=../shared/data/tfds",
      "--config.image_size=28", "--config.train_split=train[:64]",
      "--config.eval_split=test[:240]", "--config.num_train_steps=2",
      "--config.data_download=false", f"--workdir={workdir}", cwd=REPO))
  assert "Training sasa_tiny on fashion_mnist" in out
  assert "on 240 examples" in out
  assert out.count("Load dataset info from") == 1  # The dataset is opened once.
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["data_dir"] == "../shared/data/tfds" and saved["image_size"] == 28
