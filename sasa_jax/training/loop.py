"""``train_and_evaluate``: the training loop, resumable from its newest intact checkpoint.

It only orchestrates: the :class:`~sasa_jax.training.experiment.Experiment` builds the
pieces, the jitted steps compute, the :class:`~sasa_jax.workdir.checkpointer.Checkpointer`
saves and restores, the :class:`~sasa_jax.training.reporting.Reporter` tells.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
from absl import logging

from sasa_jax.config import checks, keys
from sasa_jax.errors import TrainingInterrupted, WorkdirError
from sasa_jax.training import optimizers, reporting, run_plan, steps
from sasa_jax.training.experiment import Experiment
from sasa_jax.workdir import layout, lock, signals
from sasa_jax.workdir.checkpointer import Checkpointer


def train_and_evaluate(config, workdir: str, *, restart_from_scratch: bool = False
                       ) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its newest intact checkpoint).

  One run per workdir: the workdir's lock is held throughout. A SIGTERM or Ctrl-C
  while setting up (until the input pipeline starts) exits at once, saying so; later,
  the run checkpoints after the current step, then raises ``TrainingInterrupted``. A
  state that training produced is saved before anything else can fail: at a step that
  both saves and evaluates, the save comes first. A failed save raises
  ``CheckpointSaveError`` at the next step.
  ``restart_from_scratch``: train from step 0 in a workdir whose checkpoints were all
  found damaged and moved aside (refused otherwise).

  Returns ``{'step', 'start_step', 'train': last logged train metrics, 'eval': last
  eval metrics (of the EMA weights when ``ema_decay > 0``), 'eval_params'}``.
  """
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(signals.StopOnSignals(jax.process_count()))
    experiment = Experiment(config, workdir)
    plan = experiment.plan
    stack.enter_context(lock.WorkdirLock(workdir))
    checkpointer = stack.enter_context(Checkpointer(
        workdir, max_to_keep=config.max_to_keep,
        save_interval_steps=plan.checkpoint_every_steps,
        async_checkpointing=config.async_checkpointing))
    state, start_step = restore_or_initialize(experiment, checkpointer,
                                              restart_from_scratch)
    layout.save_config(workdir, config)
    report = stack.enter_context(reporting.Reporter(
        config, plan, experiment.schedule, workdir, start_step,
        last_checkpoint=checkpointer.latest_step))
    train_step_fn = experiment.jitted_train_step()
    eval_step_fn = experiment.jitted_eval_step()
    stop.training_started(checkpointer)  # Before grain starts any worker process.
    batches = stack.enter_context(experiment.train_batches(start_step))
    for step in range(start_step + 1, plan.num_train_steps + 1):
      state, metrics = train_step_fn(state, next(batches))
      checkpointer.check_saved()  # A failed save stops the run here.
      is_last = step == plan.num_train_steps
      report.record_step(step, metrics, log=step % config.log_every_steps == 0 or is_last)
      stopping = stop.requested(step)
      if is_last or stopping or checkpointer.should_save(step):
        report.check_finite()  # A non-finite state is never checkpointed.
        checkpointer.save(step, state, data_position(step, config), config)
      if stopping and not is_last:
        checkpointer.wait_until_finished()
        signum = stop.received or signal.SIGTERM
        raise TrainingInterrupted(
            f"Stopped by {signals.describe(signum)} after step {step}, saved a checkpoint "
            f"in {checkpointer.directory}. Re-run the same command to resume.", signum)
      if step % plan.eval_every_steps == 0 or is_last:
        with report.throughput_paused():
          results = experiment.evaluate_state(state, eval_step_fn)
        report.eval_results(step, results)
    if start_step >= plan.num_train_steps:  # Its evaluation was logged by that run.
      logging.info("Already trained to step %d (num_train_steps=%d); evaluating.",
                   start_step, plan.num_train_steps)
      report.eval_results(start_step, experiment.evaluate_state(state, eval_step_fn),
                          to_tensorboard=False)
  report.finished(max(start_step, plan.num_train_steps), checkpointer.directory)
  return report.summary(start_step)


def restore_or_initialize(experiment: Experiment, checkpointer: Checkpointer,
                          restart_from_scratch: bool = False
                          ) -> tuple[steps.TrainState, int]:
  """The newest intact checkpoint's state and step, or a new state at step 0.

  A workdir whose checkpoints were all moved aside as damaged (by this run or an
  earlier one) starts from step 0 only with ``restart_from_scratch``, which is
  refused where an intact checkpoint exists (nothing is ever thrown away).
  """
  restored = checkpointer.restore_latest(experiment.abstract_state(),
                                         resume_check(experiment.config))
  if restored is None:
    damaged = checkpointer.moved_aside()
    if damaged and not restart_from_scratch:
      raise WorkdirError(
          f"workdir={experiment.workdir!r} has no intact checkpoint: the damaged ones "
          f"({', '.join(damaged)}) were moved to {checkpointer.corrupt_directory}. "
          f"Pass --restart_from_scratch to train from step 0 in this workdir anyway "
          f"(they stay there), or use another workdir.")
    return experiment.initial_state(), 0
  step, state, saved_position = restored
  if restart_from_scratch:
    raise WorkdirError(
        f"--restart_from_scratch: workdir={experiment.workdir!r} holds an intact "
        f"checkpoint (step {step}) to resume from; it only starts over when all of its "
        f"checkpoints were moved aside. Use another workdir to start over.")
  _check_data_position(saved_position, step, experiment.config)
  logging.info("Resuming from %s at step %d.", checkpointer.directory, step)
  _explain_new_length(checkpointer.saved_config(step), step, experiment)
  return state, step


def _explain_new_length(saved: Mapping[str, Any], step: int, experiment: Experiment
                        ) -> None:
  """Says plainly what resuming a run with another length does to its schedule.

  The schedule is recomputed for the new length (the documented choice: a run extended
  from N to M steps continues as the run of M steps would, from the step it resumes
  at), so the learning rate jumps at the resume step, e.g. from about 0 at the end of a
  finished cosine schedule back up.
  """
  saved_config = ml_collections.ConfigDict(checks.with_defaults(saved))
  saved_plan = run_plan.create_run_plan(saved_config, experiment.info.num_train_examples)
  plan = experiment.plan
  if saved_plan.num_train_steps == plan.num_train_steps:
    return
  old = optimizers.create_learning_rate_schedule(saved_config, saved_plan)
  logging.warning(
      "This run was planned for %d steps and now has %d: the learning-rate schedule is "
      "recomputed for %d steps (%s decay to 0 at the last step), so the learning rate "
      "of step %d is %.4g instead of %.4g in the saved run's schedule.",
      saved_plan.num_train_steps, plan.num_train_steps, plan.num_train_steps,
      experiment.config.lr_schedule, step + 1, float(experiment.schedule(step)),
      float(old(step)))


def resume_check(config):
  """The check that a checkpoint's saved config belongs to ``config``'s run: keys of
  scope ``run`` must be equal (a :class:`WorkdirError` lists those that are not); the
  changed ``loop`` and ``host`` keys are listed in a warning."""

  def check(saved: Mapping[str, Any], source: str) -> None:
    diffs = checks.differences(saved, checks.config_to_dict(config))
    fatal = {k: v for k, v in diffs.items() if checks.scope(k) is keys.Scope.RUN}
    if fatal:
      raise WorkdirError(
          f"This config differs from the one saved with {source}:\n"
          f"{checks.format_differences(fatal, ('(saved)', '(now)'))}\n"
          f"Resume it with the same config (or omit --config with --mode=evaluate), "
          f"or use another workdir.")
    if diffs:
      logging.warning("Resuming %s with changed settings: %s", source, ", ".join(
          f"{k}: {a!r} -> {b!r}" for k, (a, b) in diffs.items()))

  return check


def data_position(step: int, config) -> dict[str, Any]:
  """The input pipeline's position saved with a checkpoint at ``step``: the next global
  batch is number ``step`` of the stream of ``config.seed`` and ``config.batch_size``."""
  return {"next_batch": int(step), "batch_size": int(config.batch_size),
          "seed": int(config.seed)}


def _check_data_position(position: Mapping[str, Any] | None, step: int, config) -> None:
  expected = data_position(step, config)
  if position is None or dict(position) != expected:
    raise WorkdirError(
        f"The checkpoint at step {step} records the data position {position}, "
        f"expected {expected}: its data stream does not match this config.")
