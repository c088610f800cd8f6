"""A workdir written before the layout change (version 0.1.0 of the code: ``tests/data/
workdir_0_1_0``, 4 steps of the tiny config below, a checkpoint at step 4) still resumes
and evaluates."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import tiny_config

from sasa_jax import training

OLD_WORKDIR = Path(__file__).parent / "data" / "workdir_0_1_0"


def test_an_old_workdir_resumes_and_evaluates(tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(OLD_WORKDIR, workdir)
  evaluated = training.evaluate_checkpoint(None, str(workdir))  # Its saved config.
  assert evaluated["step"] == 4 and evaluated["num_examples"] == 360
  summary = training.train_and_evaluate(
      tiny_config(num_train_steps=6, max_to_keep=1), str(workdir))
  assert summary["start_step"] == 4 and summary["step"] == 6
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["6"]
