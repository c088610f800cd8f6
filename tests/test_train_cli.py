"""``train.py`` as users run it: default workdir, resume, evaluate, bad flags."""

from __future__ import annotations

import json
import os

import pytest
from conftest import REPO, run_train_py

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
def test_train_resume_evaluate_from_the_command_line(tmp_path, jax_compilation_cache):
  # No --workdir: ./workdirs/default, and the run says where it wrote.
  out = _ok(run_train_py(*TINY, "--config.num_train_steps=2", cwd=tmp_path,
                         cache_dir=jax_compilation_cache))
  workdir = tmp_path / "workdirs" / "default"
  assert f"workdir: {workdir}" in out
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
  assert (workdir / "config.json").exists()
  assert "train/loss=" in out and "] eval weights: loss" in out

  # The same command with a longer run resumes at the saved step.
  out = _ok(run_train_py(*TINY, "--config.num_train_steps=4", cwd=tmp_path,
                         cache_dir=jax_compilation_cache))
  assert "Resuming from" in out and "at step 2." in out
  assert "steps 2 -> 4" in out
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]

  # Evaluate the latest checkpoint with the config saved in the workdir.
  out = _ok(run_train_py("--mode=evaluate", f"--workdir={workdir}",
                         cache_dir=jax_compilation_cache))
  report = json.loads((workdir / "evaluation.json").read_text())
  assert report["step"] == 4 and report["num_examples"] == 360
  assert 0.0 <= report["accuracy"] <= report["top5_accuracy"] <= 1.0
  assert report["loss"] > 0 and "evaluation.json" in out


@pytest.mark.parametrize("args,message", [
    (("--config.bach_size=3",),
     "unknown config key 'bach_size' (did you mean 'batch_size'?)"),
    (("--config.optimizer=adam",), "config.optimizer='adam' is invalid: allowed "
     "'sgd' or 'adamw'"),
    (("--config.batch_size=many",), "--config.batch_size=many"),
    (("--mode=fit",), "value should be one of <train|evaluate>"),
    (("--checkpoint_step=3",), "--checkpoint_step is only used with --mode=evaluate"),
    (("--config={repo}/configs/imagenet.py:resnet99",),
     "configs/imagenet.py: model must be one of"),
    (("--mode=evaluate", "--workdir={tmp}"), "holds no checkpoints to evaluate"),
    (("extra",), "Unexpected arguments: extra"),
])
def test_bad_flags_are_clear_errors(tmp_path, args, message):
  result = run_train_py(*(a.format(tmp=tmp_path, repo=REPO) for a in args),
                        f"--workdir={tmp_path / 'w'}" if "--workdir" not in
                        " ".join(args) else "--config.seed=0", cwd=tmp_path)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert not (tmp_path / "w" / "checkpoints").exists()
