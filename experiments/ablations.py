r"""The paper's ablations (§4), reproduced at small scale on Fashion-MNIST.

    python -m experiments.ablations --workdir=DIR [--data_dir=DIR] [--quick] \
        [--ablations=table1,kernel,...]

Trains every run of ``configs/fashion_mnist.py``'s ``sweep`` (the variants of its
``ABLATIONS``, each with its seeds) with the config's ``BUDGETS['default']`` (``--quick``:
``BUDGETS['quick']``, a tiny smoke test), one after the other in this process, each in its
own sub-directory ``DIR/<run name>`` (a ``train.py`` workdir). Then writes
``DIR/report.md`` and its plots (``experiments.report``).

Resumable: killed and re-run with the same command, the sweep skips the runs that have
their ``result.json`` and resumes the interrupted one from its last checkpoint (as
``train.py`` does); a second run of a finished sweep only rewrites the report. A run's
name says what its overrides are (``sasa_fmnist_conv_stem-kernel_size=3-seed=1``);
overrides equal to the model's registered values are dropped, so that a variant listed in
several ablations is one run. Compiled programs are cached in ``DIR/jax_cache``: seeds of
a variant compile once, and a resumed sweep does not recompile.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import app, flags, logging

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # `configs` lives beside the package, as for train.py.
  sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import fashion_mnist
from experiments import report
from sasa_jax import data, errors, models, training
from sasa_jax.config import checks
from sasa_jax.models import flops
from sasa_jax.training import loop
from sasa_jax.workdir import layout

# pylint: enable=g-import-not-at-top,wrong-import-position

RESULT_FILE = "result.json"
CACHE_DIR = "jax_cache"
_NAMES = [ablation.name for ablation in fashion_mnist.ABLATIONS]

_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: one sub-directory "
                               "per run, report.md and its plots.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir holding fashion_mnist "
                                "(default: TFDS's, downloading it if needed).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny budget and models (a smoke test, minutes).")
_ABLATIONS = flags.DEFINE_multi_enum("ablations", _NAMES, _NAMES,
                                     "The ablations to train and report (default: all).")


def canonical(overrides: Mapping[str, Any]) -> dict[str, Any]:
  """``overrides`` without the model overrides that equal the model's registered fields
  (``model_overrides.kernel_size=7`` on a k = 7 model), keys sorted."""
  model = overrides.get("model", fashion_mnist.get_config().model)
  registered = models.create(model)
  prefix = "model_overrides."
  return {key: value for key, value in sorted(overrides.items())
          if not (key.startswith(prefix) and
                  getattr(registered, key[len(prefix):]) == value)}


def run_name(overrides: Mapping[str, Any]) -> str:
  """``model-key=value-...`` (model overrides by field name; tuples joined by ``+``)."""

  def text(value):
    if isinstance(value, (tuple, list)):
      return "+".join(map(text, value))
    return str(value)

  parts = [text(overrides.get("model", fashion_mnist.get_config().model))]
  for key, value in overrides.items():
    if key != "model":
      parts.append(f"{key.rsplit('.', 1)[-1]}={text(value)}")
  return "-".join(parts)


def sweep_runs(ablations: Sequence[Any], max_seeds: int | None) -> dict[str, dict[str, Any]]:
  """``{run name: canonical overrides}`` of ``fashion_mnist.sweep``, each run once."""
  runs = {}

  def add(**overrides):
    overrides = canonical(overrides)
    runs.setdefault(run_name(overrides), overrides)

  fashion_mnist.sweep(add, ablations, max_seeds)
  return runs


def variant_runs(ablation, variant, runs: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The names of ``variant``'s runs among ``runs`` for the seeds of ``ablation``."""
  key = canonical(variant.overrides)
  return [name for name, overrides in runs.items()
          if overrides.get("seed", 0) < variant.num_seeds(ablation) and
          {k: v for k, v in overrides.items() if k != "seed"} == key]


def group_runs(ablations: Sequence[Any], runs: Mapping[str, Mapping[str, Any]]
               ) -> dict[str, dict[str, list[str]]]:
  """``{ablation name: {variant label: its run names}}`` among ``runs``."""
  return {a.name: {v.label: variant_runs(a, v, runs) for v in a.variants}
          for a in ablations}


def run_config(overrides: Mapping[str, Any], budget: Mapping[str, Any],
               data_dir: str | None):
  """``fashion_mnist.get_config()`` with ``budget``, then ``overrides`` (dotted keys)."""
  config = fashion_mnist.get_config()
  config.update_from_flattened_dict({**budget, **overrides})
  if data_dir is not None:
    config.data_dir = data_dir
  return config


def train(config, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) one run and writes its ``result.json``; returns the result."""
  start = time.perf_counter()
  summary = training.train_and_evaluate(config, workdir)
  info = data.open_dataset(config).info
  shape = (1, config.image_size, config.image_size, info.num_channels)
  result = {
      "step": summary["step"],
      "start_step": summary["start_step"],
      "seconds": time.perf_counter() - start,
      "eval": summary["eval"],
      **flops.count(training.create_model(config, info.num_classes), shape, train=False),
      "config": checks.config_to_dict(config),
  }
  layout.write_json(os.path.join(workdir, RESULT_FILE), result)
  return result


def finished(config, workdir: str) -> dict[str, Any] | None:
  """The ``result.json`` of a finished run of ``config`` (None if it has none); one
  written with another config is an error (the check of a resumed run's config)."""
  path = os.path.join(workdir, RESULT_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  loop.resume_check(config)(result["config"], path)
  return result


def _enable_compilation_cache(directory: str) -> None:
  """Persistent XLA cache (unless the environment chose one): seeds share programs."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.WARNING)  # Each run prints its progress and evaluations.

  preset = "quick" if _QUICK.value else "default"
  budget = fashion_mnist.BUDGETS[preset]
  ablations = [a for a in fashion_mnist.ABLATIONS if a.name in _ABLATIONS.value]
  runs = sweep_runs(ablations, fashion_mnist.MAX_SEEDS[preset])
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  _enable_compilation_cache(os.path.join(workdir, CACHE_DIR))
  print(f"Sweep ({preset}): {len(runs)} runs of {', '.join(a.name for a in ablations)} "
        f"in {os.path.abspath(workdir)}.", flush=True)
  results = {}
  try:
    for i, (name, overrides) in enumerate(runs.items(), 1):
      config = run_config(overrides, budget, _DATA_DIR.value)
      run_dir = os.path.join(workdir, name)
      results[name] = finished(config, run_dir)
      if results[name] is not None:
        print(f"[{i}/{len(runs)}] {name}: finished before, test accuracy "
              f"{results[name]['eval']['accuracy']:.2%}.", flush=True)
        continue
      print(f"[{i}/{len(runs)}] {name}: training.", flush=True)
      results[name] = train(config, run_dir)
      result = results[name]
      print(f"[{i}/{len(runs)}] {name}: steps {result['start_step']} -> {result['step']} in "
            f"{result['seconds']:.0f} s, test accuracy {result['eval']['accuracy']:.2%}.",
            flush=True)
  except errors.TrainingInterrupted as e:  # SIGTERM: checkpointed; re-run to continue.
    print(f"experiments.ablations: {e}", file=sys.stderr, flush=True)
    sys.exit(128 + 15)
  except errors.Error as e:
    sys.exit(f"experiments.ablations: error: {e}")
  command = "python -m experiments.ablations " + " ".join(map(shlex.quote, sys.argv[1:]))
  path = report.write(workdir, ablations, group_runs(ablations, runs), results,
                      preset=preset, budget=budget, command=command)
  print(f"Wrote {os.path.abspath(path)}", flush=True)


if __name__ == "__main__":
  app.run(main)
