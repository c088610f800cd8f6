"""experiments.ablations: the sweep's runs, and the runner killed, re-run and reporting."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, subprocess_env

from configs import fashion_mnist
from experiments import ablations
from sasa_jax import models
from sasa_jax.config import checks as config_validation

SHARED_TFDS = REPO.parent / "shared" / "data" / "tfds"


def _groups(max_seeds=None):
  runs = ablations.sweep_runs(fashion_mnist.ABLATIONS, max_seeds)
  return runs, ablations.group_runs(fashion_mnist.ABLATIONS, runs)


def test_the_sweep_covers_the_papers_comparisons_with_shared_runs():
  runs, groups = _groups()
  assert set(groups) == {"table1", "kernel", "positional", "content", "stem", "conv_early",
                         "width", "borders", "dilation"}
  for ablation in fashion_mnist.ABLATIONS:
    for variant in ablation.variants:
      seeds = 3 if ablation.name in ("table1", "positional") or (
          variant.x == 64 and variant.series != "full attention") else 2
      assert len(groups[ablation.name][variant.label]) == seeds, variant.label
  # The same config is one run: the conv-stem k = 7 relative model is Table 1's middle
  # column, k = 7, "relative", "q.k + q.r", the stem ablation's conv stem and "all
  # attention".
  base = groups["table1"]["conv stem + attention"]
  assert base == ["sasa_fmnist_conv_stem-seed=0", "sasa_fmnist_conv_stem-seed=1",
                  "sasa_fmnist_conv_stem-seed=2"]
  for ablation, label in (("kernel", "k = 7"), ("positional", "relative"),
                          ("content", "q.k + q.r"), ("stem", "conv stem"),
                          ("conv_early", "all attention"), ("borders", "exclude (SASA)"),
                          ("dilation", "dilation 1")):
    assert groups[ablation][label] == base[:len(groups[ablation][label])]
  assert groups["kernel"]["k = 9"] == ["sasa_fmnist_conv_stem-kernel_size=9-seed=0",
                                       "sasa_fmnist_conv_stem-kernel_size=9-seed=1"]
  all_names = [n for variants in groups.values() for names in variants.values() for n in names]
  assert groups["borders"]["shift (NATTEN)"] == ["sasa_fmnist_conv_stem-borders=shift-seed=0",
                                                 "sasa_fmnist_conv_stem-borders=shift-seed=1"]
  assert set(all_names) == set(runs) and len(runs) == 43
  # The width ablation's C = 16 runs are Table 1's.
  assert groups["width"]["conv stem + attention, C = 16"] == base[:2]
  # Quick: at most two seeds per variant.
  quick, _ = _groups(fashion_mnist.MAX_SEEDS["quick"])
  assert set(quick) < set(runs) and not any("seed=2" in n for n in quick)


def test_every_run_is_a_valid_config_of_one_recipe():
  runs, _ = _groups()
  recipe = None
  for name, overrides in runs.items():
    config = ablations.run_config(overrides, fashion_mnist.BUDGETS["default"], None)
    config_validation.validate_config(config)
    models.create(config.model, **{k: v for k, v in config.model_overrides.items()
                                   if v is not None})
    # Only the model, its overrides and the seed differ between runs.
    fields = {k: v for k, v in config_validation.config_to_dict(config).items()
              if k not in ("model", "model_overrides", "seed")}
    assert recipe is None or fields == recipe, name
    recipe = fields
  assert recipe["train_split"] == fashion_mnist.BUDGETS["default"]["train_split"]
  assert recipe["eval_split"] == "test"  # The whole test split.


def test_run_names_drop_overrides_equal_to_the_registered_model():
  assert ablations.canonical({"model": "sasa_fmnist_conv_stem", "seed": 1,
                              "model_overrides.kernel_size": 7}) == {
                                  "model": "sasa_fmnist_conv_stem", "seed": 1}
  overrides = ablations.canonical({"model": "sasa_fmnist_conv_stem", "seed": 0,
                                   "model_overrides.spatial": ("conv", "attention")})
  assert ablations.run_name(overrides) == "sasa_fmnist_conv_stem-spatial=conv+attention-seed=0"


def _sweep(workdir, *, wait_for=None):
  """Runs the quick content ablation (4 runs, 2 models); with ``wait_for``, sends
  SIGTERM when a line matching it is printed and returns at once."""
  command = [sys.executable, "-m", "experiments.ablations", "--quick",
             f"--workdir={workdir}", f"--data_dir={SHARED_TFDS}", "--ablations=content"]
  process = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
  lines = []
  for line in process.stdout:
    lines.append(line)
    if wait_for and re.search(wait_for, line):
      process.send_signal(signal.SIGTERM)
      wait_for = None
  process.wait(timeout=600)
  return process.returncode, "".join(lines)


def _results(workdir):
  return {name: (os.path.getmtime(workdir / name / "result.json"),
                 json.loads((workdir / name / "result.json").read_text()))
          for name in os.listdir(workdir) if (workdir / name / "result.json").exists()}


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_TFDS.exists(), reason=f"{SHARED_TFDS} (Fashion-MNIST) absent")
def test_sweep_is_resumable_and_reports(tmp_path):
  workdir = tmp_path / "sweep"
  # Stopped while the second run trains: the first run is finished.
  code, out = _sweep(workdir, wait_for=r"\[2/4\] .*: training\.")
  assert code in (128 + 15, -signal.SIGTERM), out[-3000:]
  done = _results(workdir)
  assert list(done) == ["sasa_fmnist_conv_stem-seed=0"], out[-3000:]
  assert not (workdir / "report.md").exists()

  # Re-run: the finished run is not redone, the others are trained (the interrupted one
  # from its checkpoint if it had written one), and the report is written.
  code, out = _sweep(workdir)
  assert code == 0, out[-3000:]
  assert "[1/4] sasa_fmnist_conv_stem-seed=0: finished before" in out
  assert out.count(": training.") == 3
  results = _results(workdir)
  assert results["sasa_fmnist_conv_stem-seed=0"] == done["sasa_fmnist_conv_stem-seed=0"]
  assert len(results) == 4 and all(r["step"] == 4 for _, r in results.values())

  report = (workdir / "report.md").read_text()
  rows = {line.split(" | ")[0].lstrip("| "): line.split(" | ")
          for line in report.splitlines() if line.startswith("| q.")}
  assert set(rows) == {"q.k + q.r", "q.r only"}
  for label, overrides in (("q.k + q.r", {}), ("q.r only", {"content": False})):
    cells = rows[label]
    names = [n for n in results if ("content=False" in n) == bool(overrides)]
    accuracies = [results[n][1]["eval"]["accuracy"] for n in names]
    mean = 100 * sum(accuracies) / 2
    assert cells[1].startswith(f"{mean:.2f} ± "), cells  # Two seeds: mean ± std.
    assert cells[2] == "2"
    counts = models.describe("sasa_fmnist_conv_stem", width=8, stage_sizes=(1, 1),
                             **overrides)
    assert results[names[0]][1]["params"] == counts["params"]
    assert float(cells[3].rstrip("K")) == pytest.approx(counts["params"] / 1e3, abs=0.01)
    assert float(cells[5]) > 0  # Train images/s, from the TensorBoard logs.
  for png in ("content.png", "content_curves.png"):
    assert (workdir / png).stat().st_size > 10_000

  # A finished sweep trains nothing: it only rewrites the report.
  before = (workdir / "report.md").stat().st_mtime
  time.sleep(0.01)
  code, out = _sweep(workdir)
  assert code == 0 and ": training." not in out and out.count("finished before") == 4
  assert _results(workdir) == results
  assert (workdir / "report.md").stat().st_mtime > before
