"""What a training run reports, and where: the console (process 0) and TensorBoard.

:class:`Reporter` is the loop's one channel for telling: the run's start (its plan),
every step (the progress bar), the train metrics every ``log_every_steps`` (kept on
device until then), each evaluation, and the end. Lines look like::

    [step 100/606, epoch 4.45] train loss=0.2638 accuracy=0.9325 grad_norm=0.8365 ...
    [step 202] eval weights: loss 0.1371, top-1 96.11%, top-5 100.00% on 360 examples
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from sasa_jax.config import checks
from sasa_jax.distributed import mesh
from sasa_jax.errors import NonFiniteLossError
from sasa_jax.training import console, run_plan, tensorboard
from sasa_jax.workdir import layout


class Reporter:
  """What a run tells: the console (process 0) and TensorBoard, from its start to its end.

  The train metrics of the steps since the last log stay on device until ``record_step``
  logs them (means of loss, accuracy and gradient norm, the learning rate and the
  throughput, as ``train/...`` scalars), after checking that every step was finite;
  ``check_finite`` raises :class:`NonFiniteLossError` naming the first non-finite step.
  The first step (compilation) is timed on its own, and evaluations (inside
  ``throughput_paused()``) do not count in the throughput.

  Args: the run's ``config``, its ``plan`` and learning-rate ``schedule``, its
  ``workdir`` (TensorBoard logs go to ``<workdir>/tensorboard``), the step it starts
  from, and ``last_checkpoint()``, the step of the newest checkpoint (for messages).
  """

  def __init__(self, config, plan: run_plan.RunPlan, schedule, workdir: str,
               start_step: int, last_checkpoint: Callable[[], int | None] = lambda: None):
    self._config = config
    self._last_checkpoint = last_checkpoint
    self._plan = plan
    self._schedule = schedule
    self._workdir = workdir
    self._start_step = start_step
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self._timer = console.StepTimer(start_step)
    self._writer = tensorboard.MetricWriter(
        os.path.join(workdir, layout.TENSORBOARD_DIR), start_step=start_step,
        enabled=mesh.is_main_process())
    self._console = console.ProgressBar(start_step, plan.num_train_steps,
                                        enabled=mesh.is_main_process())
    self.last_train: dict[str, float] = {}
    self.last_eval: dict[str, dict[str, float]] = {}

  def __enter__(self) -> "Reporter":
    config = self._config
    logging.info("Training %s on %s, steps %d -> %d, global batch %d over %d device(s) "
                 "in %d process(es).", config.model, config.dataset, self._start_step,
                 self._plan.num_train_steps, config.batch_size, jax.device_count(),
                 jax.process_count())
    logging.info("Run plan: %s.", self._plan.describe())
    if self._plan.warmup_steps >= self._plan.num_train_steps > self._start_step:
      logging.warning(
          "The warm-up (%d steps) is not shorter than the run (%d steps): the learning "
          "rate never reaches its peak %.4g. Lower warmup_epochs (or warmup_steps).",
          self._plan.warmup_steps, self._plan.num_train_steps, self._plan.learning_rate)
    if self._start_step == 0:
      self._writer.write_text(0, "config", "```\n" + json.dumps(
          checks.config_to_dict(config), indent=2) + "\n```\n\n"
          + self._plan.describe())
    self._console.__enter__()
    return self

  def __exit__(self, *exc) -> None:
    self._console.__exit__(*exc)
    self._writer.__exit__(*exc)  # A failed flush does not hide the error in flight.

  def record_step(self, step: int, metrics: dict[str, jax.Array], log: bool) -> None:
    """Takes the device metrics of ``step``; with ``log``, logs the steps since the last
    log."""
    self._pending.append((step, metrics))
    if step == self._start_step + 1:
      jax.block_until_ready(metrics)
      self._console.first_step_done(step, self._timer.first_step_seconds())
    if log:
      self.last_train = self._summarize(step)
      self._writer.write_scalars(step, self.last_train)
      self._console.write(train_line(step, self._plan, self.last_train))
    self._console.update(step, loss=self.last_train.get("train/loss"),
                         images_per_second=self.last_train.get("train/images_per_second"))

  def check_finite(self) -> None:
    check_finite(self._pending, self._last_checkpoint())

  def _summarize(self, step: int) -> dict[str, float]:
    self.check_finite()
    host = jax.device_get([m for _, m in self._pending])
    self._pending.clear()
    scalars = {f"train/{k}": float(np.mean([m[k] for m in host]))
               for k in ("loss", "accuracy", "grad_norm")}
    scalars["train/learning_rate"] = float(self._schedule(step - 1))
    rate = self._timer.steps_per_second(step)
    if rate is not None:
      scalars["train/steps_per_second"] = rate
      scalars["train/images_per_second"] = rate * self._config.batch_size
    return scalars

  def throughput_paused(self):
    """A context whose time (an evaluation) the throughput leaves out."""
    return self._timer.paused()

  def eval_results(self, step: int, results: dict[str, dict[str, float]],
                   to_tensorboard: bool = True) -> None:
    self.last_eval = results
    if to_tensorboard:
      self._writer.write_scalars(step, eval_scalars(results))
    self._console.write(eval_line(step, results))

  def finished(self, step: int, checkpoint_dir: str) -> None:
    if mesh.is_main_process():
      print(f"Trained {self._config.model} to step {step}; workdir: "
            f"{os.path.abspath(self._workdir)} (checkpoints in "
            f"{checkpoint_dir}, TensorBoard logs in "
            f"{os.path.abspath(self._writer.logdir)}).", flush=True)

  def summary(self, start_step: int) -> dict[str, Any]:
    last_eval = self.last_eval
    return {"step": max(start_step, self._plan.num_train_steps), "start_step": start_step,
            "train": self.last_train,
            "eval": last_eval.get("ema", last_eval.get("params", {})),
            "eval_params": last_eval.get("params", {})}


def eval_scalars(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  scalars = {}
  for name, metrics in results.items():
    prefix = "eval" if name == "params" else "eval_ema"
    for key, value in metrics.items():
      if key != "num_examples":
        scalars[f"{prefix}/{key}"] = value
  return scalars


def check_finite(pending: Sequence[tuple[int, Mapping[str, jax.Array]]],
                 last_checkpoint: int | None = None) -> None:
  """Raises :class:`NonFiniteLossError` naming the first step whose loss or gradient
  norm was NaN/Inf, and the last checkpoint (``None``: there is none) that a re-run
  would resume from."""
  if not pending:
    return
  flags = jax.device_get([m["finite"] for _, m in pending])
  for (step, metrics), ok in zip(pending, flags):
    if not ok:
      loss, grad_norm = jax.device_get((metrics["loss"], metrics["grad_norm"]))
      kept = ("no checkpoint was written yet" if last_checkpoint is None else
              f"the last checkpoint (step {last_checkpoint}) is intact")
      raise NonFiniteLossError(
          f"Non-finite training loss, gradients or parameters at step {step} "
          f"(loss={loss}, grad_norm={grad_norm}). Stopping without checkpointing this "
          f"state; {kept}. Lower config.base_learning_rate, set config.grad_clip_norm, "
          f"or check the data.")


def train_line(step: int, plan: run_plan.RunPlan, scalars: Mapping[str, float]) -> str:
  """``[step 50/606, epoch 2.23] train loss=1.524 accuracy=0.5441 ...`` (fits 120
  columns): the ``train/`` scalars without their prefix, steps/s left to the bar."""
  values = " ".join(f"{k.removeprefix('train/')}={_format(v)}" for k, v in scalars.items()
                    if k != "train/steps_per_second")
  return (f"[step {step}/{plan.num_train_steps}, epoch {plan.epochs(step):.2f}] train "
          f"{values}")


def _format(value: float) -> str:
  return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def eval_line(step: int, results: Mapping[str, Mapping[str, float]]) -> str:
  parts = []
  for name, m in results.items():
    top5 = f", top-5 {m['top5_accuracy']:.2%}" if "top5_accuracy" in m else ""
    weights = "EMA weights" if name == "ema" else "weights"
    parts.append(f"{weights}: loss {m['loss']:.4f}, top-1 {m['accuracy']:.2%}{top5} "
                 f"on {m['num_examples']} examples")
  return f"[step {step}] eval " + "; ".join(parts)
