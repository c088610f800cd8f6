"""``evaluate_checkpoint``: what ``train.py --mode=evaluate`` runs."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from sasa_jax.config import checks, keys
from sasa_jax.distributed import mesh as mesh_lib
from sasa_jax.errors import ConfigError, WorkdirError
from sasa_jax.training import reporting
from sasa_jax.training.experiment import Experiment
from sasa_jax.workdir import layout
from sasa_jax.workdir.checkpointer import Checkpointer


def evaluate_checkpoint(config, workdir: str, checkpoint_step: int | None = None,
                        overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Restores a checkpoint of ``workdir`` (the newest intact one, or
  ``checkpoint_step``), evaluates it on ``config.eval_split``, prints the metrics and
  writes them to ``<workdir>/evaluation.json``.

  ``config=None`` uses the config saved with the checkpoint, with ``overrides``
  (``{'eval_split': 'test[:50%]', ...}``: dotted keys) applied; an override that would
  change the trained model or its recipe (a key of scope ``run`` that
  ``keys.settable_when_evaluating`` does not list, with another value) is refused. The
  top-level metrics are those of the EMA weights when the run keeps an EMA (the
  paper's), else of the raw weights; both are in the file. Nothing in the workdir
  changes but that file.
  """
  if not os.path.isdir(os.path.join(workdir, layout.CHECKPOINT_DIR)):
    raise WorkdirError(
        f"workdir={workdir!r} holds no checkpoints to evaluate; train first with "
        f"`python train.py --config=... --workdir={workdir}`.")
  with Checkpointer(workdir, read_only=True) as checkpointer:
    steps = checkpointer.all_steps()
    if not steps:
      raise WorkdirError(
          f"workdir={workdir!r} holds no checkpoints to evaluate; train first.")
    if checkpoint_step is not None and checkpoint_step not in steps:
      raise ConfigError(f"--checkpoint_step={checkpoint_step}: no such checkpoint "
                        f"in {checkpointer.directory}; available steps: {steps}.")
    if config is None:
      config = _saved_config(checkpointer, checkpoint_step, overrides or {})
    experiment = Experiment(config, workdir)
    abstract_state = experiment.abstract_state()
    if checkpoint_step is None:
      restored = checkpointer.restore_latest(abstract_state, evaluation_check(config))
      if restored is None:
        raise WorkdirError(f"No intact checkpoint to evaluate in "
                           f"{checkpointer.directory} (see the warnings above).")
      step, state, _ = restored
    else:
      step = checkpoint_step
      state, _ = checkpointer.restore_checked(step, abstract_state,
                                              evaluation_check(config))
  results = experiment.evaluate_state(state, experiment.jitted_eval_step())
  main = results.get("ema", results["params"])
  report = {"step": int(step), **main,
            "weights": "ema" if "ema" in results else "params",
            "model": config.model, "dataset": config.dataset,
            "split": config.eval_split, "metrics": results}
  if mesh_lib.is_main_process():
    print(reporting.eval_line(step, results), flush=True)  # Before writing: never lost.
    path = os.path.abspath(os.path.join(workdir, layout.EVALUATION_FILE))
    try:
      layout.write_json(path, report)
    except OSError as e:
      raise WorkdirError(f"Could not write {path}: {e.strerror}. The metrics are "
                         f"printed above.") from e
    print(f"Wrote {path}", flush=True)
  return report


def evaluation_check(config):
  """The check that a checkpoint's saved config is the trained model's: the keys of
  scope ``run`` must be equal, but those that evaluation may set
  (:func:`keys.settable_when_evaluating`)."""
  may_differ = keys.settable_when_evaluating()

  def check(saved: Mapping[str, Any], source: str) -> None:
    diffs = checks.differences(saved, checks.config_to_dict(config))
    fatal = {k: v for k, v in diffs.items()
             if checks.scope(k) is keys.Scope.RUN and k.split(".")[0] not in may_differ}
    if fatal:
      raise WorkdirError(
          f"This config differs from the one saved with {source}:\n"
          f"{checks.format_differences(fatal, ('(saved)', '(now)'))}\n"
          f"To evaluate that checkpoint, leave out --config: the config saved with it is "
          f"used, and --config.<key>= may set {', '.join(sorted(may_differ))}.")

  return check


def _saved_config(checkpointer: Checkpointer, step: int | None,
                  overrides: Mapping[str, Any]):
  """The config saved with checkpoint ``step`` (None: the newest readable one), with
  ``overrides`` that do not change the trained model or its recipe."""
  saved = (checkpointer.newest_config() if step is None
           else checkpointer.saved_config(step))
  if saved is None:
    raise WorkdirError(f"No checkpoint in {checkpointer.directory} has a readable "
                       f"config; pass --config.")
  config = ml_collections.ConfigDict(checks.with_defaults(saved))
  config.update_from_flattened_dict(dict(overrides))
  may_differ = keys.settable_when_evaluating()
  refused = {k: v for k, v in checks.differences(saved, checks.config_to_dict(config)).items()
             if checks.scope(k) is keys.Scope.RUN and k.split(".")[0] not in may_differ}
  if refused:
    raise ConfigError(
        f"{', '.join(f'--config.{k}={now!r}' for k, (_, now) in refused.items())}: "
        f"evaluating a checkpoint uses the model and the recipe saved with it "
        f"({', '.join(f'{k}={was!r}' for k, (was, _) in refused.items())}); "
        f"--config.<key>= may set {', '.join(sorted(may_differ))}.")
  return config.lock()
