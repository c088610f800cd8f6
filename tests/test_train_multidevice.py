"""Data parallelism: 1 and 8 (forced CPU) devices train the same function,
BatchNorm statistics included, for the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, subprocess_env, xla_flags

_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import jax, numpy as np
    from conftest import tiny_config
    from sasa_jax import training
    from sasa_jax.errors import ConfigError

    out = {{"devices": jax.device_count()}}
    try:  # Not divisible by 8 devices: a clear error before anything is built.
      training.Experiment(tiny_config(batch_size=12), sys.argv[1] + "/bad")
    except ConfigError as e:
      out["batch_error"] = str(e)
    summary = training.train_and_evaluate(
        tiny_config(num_train_steps=3, log_every_steps=3, eval_every_steps=3,
                    checkpoint_every_steps=3), sys.argv[1] + "/run")
    out["train_loss"] = summary["train"]["train/loss"]
    out["eval_loss"] = summary["eval"]["loss"]
    out["eval_accuracy"] = summary["eval"]["accuracy"]
    print("RESULT " + json.dumps(out))
""")


def _run(tmp_path, num_devices: int) -> dict:
  script = _SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"))
  env = subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(num_devices))
  workdir = tmp_path / f"d{num_devices}"
  result = subprocess.run([sys.executable, "-c", script, str(workdir)], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_run(tmp_path):
  one = _run(tmp_path, 1)
  eight = _run(tmp_path, 8)
  assert (one["devices"], eight["devices"]) == (1, 8)
  assert "batch_error" not in one
  assert "config.batch_size=12 is not divisible by the number of devices (8" in (
      eight["batch_error"])
  # Per-device BatchNorm (2 examples per device) would change these at ~1e-2.
  assert eight["train_loss"] == pytest.approx(one["train_loss"], rel=1e-5)
  assert eight["eval_loss"] == pytest.approx(one["eval_loss"], rel=1e-4)
  assert eight["eval_accuracy"] == pytest.approx(one["eval_accuracy"], abs=1 / 360)
