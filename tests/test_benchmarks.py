"""The benchmark commands still run (tiny shapes, one round): they are never timed here."""

from __future__ import annotations

import re

import pytest

from benchmarks import accuracy, checkpoint, crossover, input_pipeline, models, op_shapes


@pytest.mark.slow
def test_models_benchmark_prints_its_table(capsys):
  assert models.main(["--models", "resnet_tiny", "sasa_tiny", "--sizes", "8", "--batch", "2",
                      "--repeats", "1", "--dtype", "bfloat16"]) == 0
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| 8×8 |")]
  assert [row.split("|")[4].strip() for row in rows] == ["resnet_tiny", "sasa_tiny"]
  assert all("| bfloat16 |" in row for row in rows)


@pytest.mark.slow
def test_input_pipeline_benchmark_times_one_and_two_processes(capsys):
  assert input_pipeline.main(["--dataset", "digits", "--batch", "16", "--batches", "2",
                              "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  rows = [line.split(" | ") for line in out.splitlines() if re.match(r"\| [12] \|", line)]
  assert [(row[0], row[1]) for row in rows] == [("| 1", "16"), ("| 2", "8")]
  assert len(rows[1][2].split(" / ")) == 2  # Each of the two processes' images/s.


@pytest.mark.slow
def test_accuracy_check_prints_errors_and_fails_above_its_bound(capsys):
  # Every float32 error is ~1e-7 on CPU, so a 1e-9 bound must fail.
  assert accuracy.main(["--implementations", "dense", "--dtypes", "float32",
                        "--fail-above", "1e-9"]) == 1
  out = capsys.readouterr().out
  (row,) = [line for line in out.splitlines() if line.startswith("| dense |")]
  errors = [float(cell) for cell in row.strip("| ").split(" | ")[2:]]
  assert len(errors) == len(accuracy.QUANTITIES)
  assert all(0 < error < 1e-5 for error in errors)
  # The attention stem's kernels (interpreted here) against its XLA formulation.
  (row,) = [line for line in out.splitlines() if line.startswith("| float32 |")]
  errors = [float(cell) for cell in row.strip("| ").split(" | ")[1:]]
  assert len(errors) == len(accuracy.STEM_QUANTITIES)
  assert all(error < 1e-5 for error in errors)
  assert "above --fail-above 1e-09" in out


def test_shapes_benchmark_times_only_what_was_asked(capsys):
  assert op_shapes.main(["--groups", "tiny digits 8", "--implementations", "blocked",
                         "dense", "--batch", "2", "--repeats", "1"]) == 0
  out = capsys.readouterr().out
  header = next(line for line in out.splitlines() if line.startswith("| models |"))
  assert re.findall(r"(\w[\w =]*) ms", header) == ["blocked", "dense"]
  assert out.count("| tiny digits 8 |") == 2


def test_unknown_variant_is_refused_with_the_allowed_names(capsys):
  with pytest.raises(SystemExit) as exit_info:
    op_shapes.main(["--implementations", "unfold"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--implementations: invalid choice: 'unfold'" in err and "'fused'" in err


def test_crossover_table_names_the_fastest_and_flags_a_default_that_is_not():
  rows = [dict(kernel=7, size=8, channels=64, heads=8, default="dense", blocked=3.0,
               shifted=2.0, dense=2.5),
          dict(kernel=7, size=8, channels=256, heads=8, default="dense", blocked=7.0,
               shifted=7.1, dense=3.2)]
  table = crossover.crossover_table(rows)
  assert "C=64 (d=8)" in table and "C=256 (d=32)" in table
  assert "dense* / shifted; 1.25" in table  # dense ÷ the faster windowed one (shifted)
  assert "dense / dense; **0.46**" in table  # dense faster: bold, default not flagged


def test_checkpoint_benchmark_times_saves_with_and_without_checksums(capsys, tmp_path):
  assert checkpoint.main(["--model", "sasa_tiny", "--repeats", "1",
                          "--dir", str(tmp_path)]) == 0
  out = capsys.readouterr().out
  assert "sasa_tiny: 94 arrays" in out and "checksums compiled in" in out
  rows = [line for line in out.splitlines() if line.startswith("| ")][2:]
  assert [row.split("|")[1].strip() for row in rows] == [
      "checksums alone", "save (synchronous, to disk)", "async save, blocking part"]
  assert all(re.search(r"\| [\d.]+× \|$", row) for row in rows[1:]), rows
