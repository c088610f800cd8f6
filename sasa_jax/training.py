"""The training loop: ``create_train_state``, ``train_step``, ``eval_step``,
``train_and_evaluate`` and ``evaluate``; in the mould of Flax's ``examples/imagenet``.

Data parallel over every device of every host with ``jax.jit`` on a 1-D mesh
(:mod:`sasa_jax.parallel`): the state is replicated, batches are sharded, and the
compiler adds the all-reduces, so BatchNorm statistics are over the global batch.
The step functions are pure; per-step randomness is ``fold_in(key(seed), step)``.
What the loop reports (console, TensorBoard) goes through :mod:`sasa_jax.reporting`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax.training import train_state

from sasa_jax import checkpointing
from sasa_jax import config_validation
from sasa_jax import datasets
from sasa_jax import distributed
from sasa_jax import input_pipeline
from sasa_jax import models
from sasa_jax import optimizers
from sasa_jax import parallel
from sasa_jax import preprocessing
from sasa_jax import reporting
from sasa_jax import run_plan
from sasa_jax import sigterm
from sasa_jax import summary_writer
from sasa_jax import workdir_lock
from sasa_jax.errors import ConfigError, TrainingInterrupted, WorkdirError

# ``config.compute_dtype`` -> the model's computation dtype (parameters stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` (step, params, optimizer state) plus BatchNorm
  statistics and, when ``ema_decay > 0``, an EMA of both (``ema``, else None)."""

  batch_stats: Any
  ema: Any


# ---------------------------------------------------------------------------
# Building blocks.


def create_model(config, num_classes: int):
  """``models.create(config.model, num_classes, **overrides)`` with the overrides in
  ``config.model_overrides`` that are set (not None)."""
  # Lists (from a config loaded back from JSON) -> tuples: module fields are hashed.
  overrides = {k: tuple(v) if isinstance(v, list) else v
               for k, v in config.model_overrides.items() if v is not None}
  if config.compute_dtype != "float32":
    overrides.setdefault("dtype", COMPUTE_DTYPES[config.compute_dtype])
  try:
    return models.create(config.model, num_classes, **overrides)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config.model={config.model!r} / config.model_overrides="
                      f"{overrides!r}: {e}") from e


def initialized(key: jax.Array, model, image_shape: Sequence[int]) -> dict[str, Any]:
  """``model.init`` on one zero image of ``image_shape`` ``(H, W, C)``."""
  return model.init({"params": key, "dropout": key},
                    jnp.zeros((1, *image_shape), jnp.float32), train=False)


def create_train_state(key: jax.Array, config, model, image_shape: Sequence[int],
                       tx: optax.GradientTransformation) -> TrainState:
  """Initial parameters, BatchNorm statistics, optimizer state and EMA."""
  variables = initialized(key, model, image_shape)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  ema = None
  if config.ema_decay > 0:
    ema = {"params": params, "batch_stats": batch_stats}
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                           batch_stats=batch_stats, ema=ema)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, num_classes: int,
                       label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with (optional) label smoothing ``(B,)``."""
  targets = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if label_smoothing > 0:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def ema_decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """The EMA decay at ``step``: ``decay`` (the paper's constant 0.9999), or with
  ``warmup`` ``min(decay, (1 + step) / (10 + step))`` (TensorFlow's ``num_updates``
  rule, which keeps the average from staying near the random initialisation in short
  runs, but only reaches 0.9999 after ~90,000 steps)."""
  if not warmup:
    return jnp.asarray(decay, jnp.float32)
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, key: jax.Array,
               num_classes: int, label_smoothing: float, ema_decay: float,
               ema_warmup: bool, mean: Sequence[float], std: Sequence[float]
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step on a global batch; returns the new state and device metrics."""
  images = preprocessing.normalize_images(batch["image"], mean, std)
  labels = batch["label"]
  step_key = jax.random.fold_in(key, state.step)

  def loss_fn(params):
    logits, new_model_state = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, images, train=True,
        mutable=["batch_stats"], rngs={"dropout": step_key})
    loss = cross_entropy_loss(logits, labels, num_classes, label_smoothing).mean()
    return loss, (logits, new_model_state)

  (loss, (logits, new_model_state)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(
      grads=grads, batch_stats=new_model_state.get("batch_stats", state.batch_stats))
  if state.ema is not None:
    d = ema_decay_at(state.step, ema_decay, ema_warmup)
    new_ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema,
                           {"params": new_state.params,
                            "batch_stats": new_state.batch_stats})
    new_state = new_state.replace(ema=new_ema)
  grad_norm = optax.global_norm(grads)
  metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
      "grad_norm": grad_norm,
      # The state after this step may be checkpointed only if all of it is finite.
      "finite": (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                 & _all_finite(new_state.params)),
  }
  return new_state, metrics


def _all_finite(tree: Any) -> jax.Array:
  """Whether every element is finite (a norm could overflow where values do not)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def eval_step(variables: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
              apply_fn, num_classes: int, mean: Sequence[float],
              std: Sequence[float]) -> dict[str, jax.Array]:
  """Sums over the (masked) global batch: loss, top-1 (and top-5) hits, count."""
  images = preprocessing.normalize_images(batch["image"], mean, std)
  labels, mask = batch["label"], batch["mask"]
  logits = apply_fn(variables, images, train=False).astype(jnp.float32)
  loss = cross_entropy_loss(logits, labels, num_classes)
  sums = {
      "loss": jnp.sum(loss * mask),
      "top1": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
      "count": jnp.sum(mask),
  }
  if num_classes > 5:
    _, top5 = jax.lax.top_k(logits, 5)
    sums["top5"] = jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * mask)
  return sums


# ---------------------------------------------------------------------------
# The pieces a run is made of, shared by training and evaluation.


class Experiment:
  """Everything a run builds from its config before the first step (nothing compiled).

  ``train_and_evaluate`` and ``evaluate`` are made of its pieces; a notebook can use them
  one at a time: ``initial_state()`` / ``abstract_state()`` (the structure to restore a
  checkpoint onto), ``jitted_train_step()``, ``jitted_eval_step()``, ``evaluate(...)``,
  ``source(split)``, ``train_batches(start_step)``, ``checkpointer()``,
  ``metric_writer(start_step)``. Attributes: ``config``, ``workdir``, ``mesh``, ``info``
  (the dataset's ``DatasetInfo``), ``plan`` (the :class:`~sasa_jax.run_plan.RunPlan`:
  steps, intervals and peak learning rate derived from the config), ``model``,
  ``image_shape`` ``(H, W, C)``, ``schedule``, ``tx``, the ``replicated`` and
  ``data_sharding`` shardings, and the ``init_key`` / ``step_key`` folded from
  ``config.seed``.
  """

  def __init__(self, config, workdir: str):
    distributed.check_same_config(config)  # Before anything else the config steers.
    config_validation.validate_config(config)
    checkpointing.check_workdir(workdir)
    self.config = config
    self.workdir = workdir
    self.mesh = parallel.create_mesh()
    config_validation.check_batch_sizes(config, jax.device_count(),
                                        jax.process_count())
    self.info = datasets.get_dataset_info(config)
    config_validation.check_channels(config, self.info.num_channels)
    self.model = create_model(config, self.info.num_classes)
    self.image_shape = (config.image_size, config.image_size, self.info.num_channels)
    self.plan = run_plan.create_run_plan(config, self.info.num_train_examples)
    self.schedule = optimizers.create_learning_rate_schedule(config, self.plan)
    self.tx = optimizers.create_optimizer(config, self.schedule)
    self.replicated = parallel.replicated(self.mesh)
    self.data_sharding = parallel.data_sharded(self.mesh)
    root = jax.random.key(config.seed)
    self.init_key = jax.random.fold_in(root, 0)
    self.step_key = jax.random.fold_in(root, 1)
    self.norm = dict(mean=tuple(config.normalization_mean),
                     std=tuple(config.normalization_std))

  def init_fn(self):
    return functools.partial(create_train_state, config=self.config,
                             model=self.model, image_shape=self.image_shape,
                             tx=self.tx)

  def abstract_state(self) -> TrainState:
    abstract = jax.eval_shape(self.init_fn(), self.init_key)
    return parallel.with_sharding(abstract, self.replicated)

  def initial_state(self) -> TrainState:
    return jax.jit(self.init_fn(), out_shardings=self.replicated)(self.init_key)

  def jitted_train_step(self):
    """``train_step`` with this run's settings, jitted; donates the input state."""
    fn = functools.partial(train_step, key=self.step_key, num_classes=self.info.num_classes,
                           label_smoothing=self.config.label_smoothing,
                           ema_decay=self.config.ema_decay,
                           ema_warmup=self.config.ema_warmup, **self.norm)
    return jax.jit(fn, out_shardings=(self.replicated, self.replicated), donate_argnums=(0,))

  def jitted_eval_step(self):
    fn = functools.partial(eval_step, apply_fn=self.model.apply,
                           num_classes=self.info.num_classes, **self.norm)
    return jax.jit(fn, out_shardings=self.replicated)

  def source(self, split: str):
    """The random-access source of ``split`` of the config's dataset."""
    return datasets.create_source(self.config, split)

  @contextlib.contextmanager
  def train_batches(self, start_step: int) -> Iterator[Iterator[dict[str, jax.Array]]]:
    """Global training batches (sharded over the devices) from ``start_step`` on."""
    host_batches = input_pipeline.train_iterator(
        self.source(self.config.train_split), self.config, start_step=start_step,
        info=self.info)
    try:
      yield (parallel.global_batch(b, self.data_sharding) for b in host_batches)
    finally:
      input_pipeline.close(host_batches)

  def checkpointer(self) -> checkpointing.Checkpointer:
    """The run's checkpoints, saved as the config says."""
    return checkpointing.Checkpointer(
        self.workdir, max_to_keep=self.config.max_to_keep,
        save_interval_steps=self.plan.checkpoint_every_steps,
        async_checkpointing=self.config.async_checkpointing)

  def metric_writer(self, start_step: int) -> summary_writer.MetricWriter:
    return summary_writer.MetricWriter(
        os.path.join(self.workdir, checkpointing.TENSORBOARD_DIR), start_step=start_step,
        enabled=parallel.is_main_process())

  def evaluate(self, state: TrainState, eval_source, eval_step_fn
               ) -> dict[str, dict[str, float]]:
    """Metrics of the raw weights (``'params'``) and, if kept, the EMA (``'ema'``)."""
    weights = {"params": {"params": state.params, "batch_stats": state.batch_stats}}
    if state.ema is not None:
      weights["ema"] = state.ema
    return {name: evaluate_model(eval_step_fn, variables,
                                 input_pipeline.eval_iterator(eval_source, self.config,
                                                              info=self.info),
                                 self.data_sharding)
            for name, variables in weights.items()}


def evaluate_model(eval_step_fn, variables, batches: Iterable[dict[str, np.ndarray]],
                   data_sharding) -> dict[str, float]:
  """Runs the jitted ``eval_step_fn`` over ``batches``; averages on the host at the end."""
  totals = None
  for host_batch in batches:
    sums = eval_step_fn(variables, parallel.global_batch(host_batch, data_sharding))
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("The eval split produced no batches.")
  totals = jax.device_get(totals)
  count = float(totals["count"])
  out = {"loss": float(totals["loss"]) / count,
         "accuracy": float(totals["top1"]) / count,
         "num_examples": int(count)}
  if "top5" in totals:
    out["top5_accuracy"] = float(totals["top5"]) / count
  return out


# ---------------------------------------------------------------------------
# The two entry points.


def train_and_evaluate(config, workdir: str, *, restart_from_scratch: bool = False
                       ) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its newest intact checkpoint).

  One run per workdir: the workdir's lock is held throughout. A SIGTERM while
  setting up (until the input pipeline starts) exits at once, saying so; later, the
  run checkpoints after the current step, then raises ``TrainingInterrupted``. A
  failed checkpoint save raises ``CheckpointSaveError`` at the next step.
  ``restart_from_scratch``: train from step 0 in a workdir whose checkpoints were all
  found damaged and moved aside (refused otherwise).

  Returns ``{'step', 'start_step', 'train': last logged train metrics, 'eval': last
  eval metrics (of the EMA weights when ``ema_decay > 0``), 'eval_params'}``.
  """
  with contextlib.ExitStack() as stack:
    stop = stack.enter_context(_StopOnSigterm())
    experiment = Experiment(config, workdir)
    plan = experiment.plan
    stack.enter_context(workdir_lock.WorkdirLock(workdir))
    checkpointer = stack.enter_context(experiment.checkpointer())
    state, start_step = restore_or_initialize(experiment, checkpointer,
                                              restart_from_scratch)
    checkpointing.save_config(workdir, config)
    report = stack.enter_context(reporting.Reporter(experiment, start_step))
    train_step_fn = experiment.jitted_train_step()
    eval_step_fn = experiment.jitted_eval_step()
    eval_source = experiment.source(config.eval_split)
    stop.training_started(checkpointer)  # Before grain starts any worker process.
    batches = stack.enter_context(experiment.train_batches(start_step))
    for step in range(start_step + 1, plan.num_train_steps + 1):
      state, metrics = train_step_fn(state, next(batches))
      checkpointer.check_saved()  # A failed save stops the run here.
      is_last = step == plan.num_train_steps
      report.train_step(step, metrics, log=step % config.log_every_steps == 0 or is_last)
      if step % plan.eval_every_steps == 0 or is_last:
        with report.throughput_paused():
          results = experiment.evaluate(state, eval_source, eval_step_fn)
        report.eval_results(step, results)
      stopping = stop.requested(step)
      if is_last or stopping or checkpointer.should_save(step):
        report.check_finite()  # A non-finite state is never checkpointed.
        checkpointer.save(step, state, data_position(step, config), config)
      if stopping and not is_last:
        checkpointer.wait_until_finished()
        raise TrainingInterrupted(
            f"Stopped by SIGTERM after step {step}, saved a checkpoint in "
            f"{checkpointer.directory}. Re-run the same command to resume.")
    if start_step >= plan.num_train_steps:  # Its evaluation was logged by that run.
      logging.info("Already trained to step %d (num_train_steps=%d); evaluating.",
                   start_step, plan.num_train_steps)
      report.eval_results(start_step, experiment.evaluate(state, eval_source, eval_step_fn),
                          to_tensorboard=False)
  report.finished(max(start_step, plan.num_train_steps), checkpointer.directory)
  return report.summary(start_step)


def restore_or_initialize(experiment: Experiment, checkpointer: checkpointing.Checkpointer,
                          restart_from_scratch: bool = False) -> tuple[TrainState, int]:
  """The newest intact checkpoint's state and step, or a new state at step 0.

  A workdir whose checkpoints were all moved aside as damaged (by this run or an
  earlier one) starts from step 0 only with ``restart_from_scratch``, which is
  refused where an intact checkpoint exists (nothing is ever thrown away).
  """
  restored = checkpointer.restore_latest(experiment.abstract_state(), experiment.config)
  if restored is None:
    damaged = checkpointer.set_aside()
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
  return state, step


def evaluate(config, workdir: str, checkpoint_step: int | None = None
             ) -> dict[str, Any]:
  """Restores a checkpoint of ``workdir`` (the newest intact one, or
  ``checkpoint_step``), evaluates it on ``config.eval_split``, prints the metrics and
  writes them to ``<workdir>/evaluation.json``.

  ``config=None`` uses the config saved with the checkpoint. The top-level metrics
  are those of the EMA weights when the run keeps an EMA (the paper's), else of the
  raw weights; both are in the file. Nothing in the workdir changes but that file.
  """
  if not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
    raise WorkdirError(
        f"workdir={workdir!r} holds no checkpoints to evaluate; train first with "
        f"`python train.py --config=... --workdir={workdir}`.")
  with checkpointing.Checkpointer(workdir, read_only=True) as checkpointer:
    steps = checkpointer.all_steps()
    if not steps:
      raise WorkdirError(
          f"workdir={workdir!r} holds no checkpoints to evaluate; train first.")
    if checkpoint_step is not None and checkpoint_step not in steps:
      raise ConfigError(f"--checkpoint_step={checkpoint_step}: no such checkpoint "
                        f"in {checkpointer.directory}; available steps: {steps}.")
    if config is None:
      config = _saved_config(checkpointer, checkpoint_step)
    experiment = Experiment(config, workdir)
    abstract_state = experiment.abstract_state()
    if checkpoint_step is None:
      restored = checkpointer.restore_latest(abstract_state, config)
      if restored is None:
        raise WorkdirError(f"No intact checkpoint to evaluate in "
                           f"{checkpointer.directory} (see the warnings above).")
      step, state, _ = restored
    else:
      step = checkpoint_step
      state, _ = checkpointer.restore_checked(step, abstract_state, config)
  results = experiment.evaluate(state, experiment.source(config.eval_split),
                                experiment.jitted_eval_step())
  main = results.get("ema", results["params"])
  report = {"step": int(step), **main,
            "weights": "ema" if "ema" in results else "params",
            "model": config.model, "dataset": config.dataset,
            "split": config.eval_split, "metrics": results}
  if parallel.is_main_process():
    print(reporting.eval_line(step, results), flush=True)  # Before writing: never lost.
    path = os.path.abspath(os.path.join(workdir, checkpointing.EVALUATION_FILE))
    try:
      checkpointing.write_json(path, report)
    except OSError as e:
      raise WorkdirError(f"Could not write {path}: {e.strerror}. The metrics are "
                         f"printed above.") from e
    print(f"Wrote {path}", flush=True)
  return report


def _saved_config(checkpointer: checkpointing.Checkpointer, step: int | None):
  """The config saved with checkpoint ``step`` (None: the newest readable one)."""
  import ml_collections  # pylint: disable=g-import-not-at-top

  saved = (checkpointer.newest_config() if step is None
           else checkpointer.saved_config(step))
  if saved is None:
    raise WorkdirError(f"No checkpoint in {checkpointer.directory} has a readable "
                       f"config; pass --config.")
  return ml_collections.ConfigDict(saved).lock()


class _StopOnSigterm:
  """Turns SIGTERM (preemption, `kill`) into a clean stop.

  Before ``training_started``, while the run sets up (dataset, lock, restore), there
  is nothing to save: the process exits at once (``sigterm.exit_while_starting``).
  From then on, the run checkpoints after the current step and stops. With several
  processes all of them must stop at the same step: JAX's preemption sync point
  (``jax.distributed``'s preemption service catches SIGTERM), which Orbax's
  ``reached_preemption`` reads, decides.
  """

  def __init__(self):
    self._checkpointer: checkpointing.Checkpointer | None = None
    self._signalled = False
    self._previous = None

  def __enter__(self) -> "_StopOnSigterm":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self._checkpointer is None:
      sigterm.exit_while_starting()
    self._signalled = True

  def training_started(self, checkpointer: checkpointing.Checkpointer) -> None:
    """From now on, a SIGTERM stops after the current step (see ``requested``)."""
    self._checkpointer = checkpointer

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return self._checkpointer.reached_preemption(step)
    return self._signalled


def data_position(step: int, config) -> dict[str, Any]:
  """The input pipeline's position saved with a checkpoint at ``step``: the next global
  batch is number ``step`` of the stream of ``config.seed`` and ``config.batch_size``."""
  return {"next_batch": int(step), "batch_size": int(config.batch_size),
          "seed": int(config.seed)}


def _check_data_position(position: Mapping[str, Any] | None, step: int,
                         config) -> None:
  expected = data_position(step, config)
  if position is None or dict(position) != expected:
    raise WorkdirError(
        f"The checkpoint at step {step} records the data position {position}, "
        f"expected {expected}: its data stream does not match this config.")
