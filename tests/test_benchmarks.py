"""The benchmark commands still run (tiny shapes, one round): they are never timed here."""

from __future__ import annotations

import re

import pytest

from benchmarks import layers, models


def test_models_benchmark_prints_its_table(capsys):
  assert models.main(["--models", "resnet_tiny", "sasa_tiny", "--sizes", "8", "--batch", "2",
                      "--repeats", "1", "--dtype", "bfloat16"]) == 0
  out = capsys.readouterr().out
  rows = [line for line in out.splitlines() if line.startswith("| 8×8 |")]
  assert [row.split("|")[4].strip() for row in rows] == ["resnet_tiny", "sasa_tiny"]
  assert all("| bfloat16 |" in row for row in rows)


def test_shapes_benchmark_times_only_what_was_asked(capsys):
  assert layers.main(["--shapes", "--groups", "tiny digits 8", "--implementations", "blocked",
                      "dense", "--batch", "2", "--repeats", "1", "--no-torch"]) == 0
  out = capsys.readouterr().out
  header = next(line for line in out.splitlines() if line.startswith("| models |"))
  assert re.findall(r"(\w[\w =]*) ms", header) == ["blocked", "dense"]
  assert out.count("| tiny digits 8 |") == 2


def test_unknown_variant_is_refused_with_the_allowed_names(capsys):
  with pytest.raises(SystemExit) as exit_info:
    layers.main(["--shapes", "--implementations", "unfold"])
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "--implementations: invalid choice: 'unfold'" in err and "'fused'" in err
