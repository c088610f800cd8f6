"""The training loop: ``create_train_state``, ``train_step``, ``eval_step``,
``train_and_evaluate`` and ``evaluate``; in the mould of Flax's ``examples/imagenet``.

Data parallel over every device of every host with ``jax.jit`` on a 1-D mesh
(:mod:`sasa_jax.parallel`): the state is replicated, batches are sharded, and the
compiler adds the all-reduces, so BatchNorm statistics are over the global batch.
The step functions are pure; per-step randomness is ``fold_in(key(seed), step)``.
Metrics stay on device until they are logged.
"""

from __future__ import annotations

import contextlib
import functools
import json
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
from sasa_jax import distributed
from sasa_jax import input_pipeline
from sasa_jax import models
from sasa_jax import optimizers
from sasa_jax import parallel
from sasa_jax import progress
from sasa_jax import run_plan
from sasa_jax import summary_writer
from sasa_jax.errors import (ConfigError, NonFiniteLossError, TrainingInterrupted,
                             WorkdirError)

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
  images = input_pipeline.normalize_images(batch["image"], mean, std)
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
  images = input_pipeline.normalize_images(batch["image"], mean, std)
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
    self.info = input_pipeline.get_dataset_info(config)
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
    return input_pipeline.create_source(self.config, split)

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

  def checkpointer(self, read_only: bool = False) -> checkpointing.Checkpointer:
    return checkpointing.Checkpointer(
        self.workdir, max_to_keep=self.config.max_to_keep,
        save_interval_steps=self.plan.checkpoint_every_steps,
        async_checkpointing=self.config.async_checkpointing and not read_only,
        read_only=read_only)

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


def _eval_scalars(results: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
  scalars = {}
  for name, metrics in results.items():
    prefix = "eval" if name == "params" else "eval_ema"
    for key, value in metrics.items():
      if key != "num_examples":
        scalars[f"{prefix}/{key}"] = value
  return scalars


def _check_finite(pending: Sequence[tuple[int, Mapping[str, jax.Array]]]) -> None:
  """Raises :class:`NonFiniteLossError` naming the first step whose loss or
  gradient norm was NaN/Inf."""
  if not pending:
    return
  flags = jax.device_get([m["finite"] for _, m in pending])
  for (step, metrics), ok in zip(pending, flags):
    if not ok:
      loss, grad_norm = jax.device_get((metrics["loss"], metrics["grad_norm"]))
      raise NonFiniteLossError(
          f"Non-finite training loss, gradients or parameters at step {step} "
          f"(loss={loss}, grad_norm={grad_norm}). Stopping; no checkpoint of this "
          f"state was written, the last one is still valid. Lower "
          f"config.learning_rate, set config.grad_clip_norm, or check the data.")


# ---------------------------------------------------------------------------
# The two entry points.


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains ``config`` in ``workdir`` (resuming from its newest valid checkpoint).

  SIGTERM checkpoints after the current step and raises ``TrainingInterrupted``.

  Returns ``{'step', 'start_step', 'train': last logged train metrics, 'eval': last
  eval metrics (of the EMA weights when ``ema_decay > 0``), 'eval_params'}``.
  """
  experiment = Experiment(config, workdir)
  checkpointing.check_config_matches(workdir, config)
  plan = experiment.plan
  with contextlib.ExitStack() as stack:
    checkpointer = stack.enter_context(experiment.checkpointer())
    state, start_step = restore_or_initialize(experiment, checkpointer)
    checkpointing.save_config(workdir, config)
    logging.info("Training %s on %s: %s; steps %d -> %d; global batch %d over %d "
                 "device(s) in %d process(es).", config.model, config.dataset,
                 plan.describe(), start_step, plan.num_train_steps, config.batch_size,
                 jax.device_count(), jax.process_count())
    writer = stack.enter_context(experiment.metric_writer(start_step))
    if start_step == 0:
      writer.write_text(0, "config", "```\n" + json.dumps(
          config_validation.config_to_dict(config), indent=2) + "\n```\n\n"
          + plan.describe())
    console = stack.enter_context(progress.ProgressBar(
        start_step, plan.num_train_steps, enabled=parallel.is_main_process()))
    train_step_fn = experiment.jitted_train_step()
    eval_step_fn = experiment.jitted_eval_step()
    eval_source = experiment.source(config.eval_split)
    batches = stack.enter_context(experiment.train_batches(start_step))
    stop = stack.enter_context(_StopOnSigterm(checkpointer))
    metrics = TrainMetrics(experiment, start_step)

    def run_evaluation(step: int, state: TrainState) -> dict[str, dict[str, float]]:
      with metrics.timer.paused():
        results = experiment.evaluate(state, eval_source, eval_step_fn)
      writer.write_scalars(step, _eval_scalars(results))
      console.write(_eval_line(step, results))
      return results

    last_eval: dict[str, dict[str, float]] = {}
    for step in range(start_step + 1, plan.num_train_steps + 1):
      state, step_metrics = train_step_fn(state, next(batches))
      metrics.add(step, step_metrics, console)
      is_last = step == plan.num_train_steps
      if step % config.log_every_steps == 0 or is_last:
        scalars = metrics.summarize(step)
        writer.write_scalars(step, scalars)
        console.write(_train_line(step, plan, scalars))
      console.update(step, loss=metrics.last.get("train/loss"),
                     images_per_second=metrics.last.get("train/images_per_second"))
      if step % plan.eval_every_steps == 0 or is_last:
        last_eval = run_evaluation(step, state)
      stopping = stop.requested(step)
      if is_last or stopping or checkpointer.should_save(step):
        metrics.check_finite()  # A non-finite state is never checkpointed.
        checkpointer.save(step, state, data_position(step, config))
      if stopping and not is_last:
        checkpointer.wait_until_finished()
        raise TrainingInterrupted(
            f"Stopped by SIGTERM after step {step}, saved a checkpoint in "
            f"{checkpointer.directory}. Re-run the same command to resume.")
    if start_step >= plan.num_train_steps:
      logging.info("Already trained to step %d (num_train_steps=%d); evaluating.",
                   start_step, plan.num_train_steps)
      last_eval = run_evaluation(start_step, state)
  final_step = max(start_step, plan.num_train_steps)
  if parallel.is_main_process():
    print(f"Trained {config.model} to step {final_step}; workdir: "
          f"{os.path.abspath(workdir)} (checkpoints in {checkpointer.directory}, "
          f"TensorBoard logs in {os.path.abspath(writer.logdir)}).", flush=True)
  return {"step": final_step, "start_step": start_step, "train": metrics.last,
          "eval": last_eval.get("ema", last_eval.get("params", {})),
          "eval_params": last_eval.get("params", {})}


def restore_or_initialize(experiment: Experiment, checkpointer: checkpointing.Checkpointer
                          ) -> tuple[TrainState, int]:
  """The newest readable checkpoint's state and step, or a new state at step 0."""
  restored = checkpointer.restore_latest(experiment.abstract_state())
  if restored is None:
    return experiment.initial_state(), 0
  step, state, saved_position = restored
  _check_data_position(saved_position, step, experiment.config)
  logging.info("Resuming from %s at step %d.", checkpointer.directory, step)
  return state, step


class TrainMetrics:
  """The train metrics of the steps since the last log, kept on device until then.

  ``add`` times the first step (compilation) on its own; ``summarize`` fetches the
  means of loss, accuracy and gradient norm, the learning rate and the throughput
  (``train/...`` scalars, also kept as ``last``), after checking that every step was
  finite; ``check_finite`` raises :class:`NonFiniteLossError` naming the first
  non-finite step.
  """

  def __init__(self, experiment: Experiment, start_step: int):
    self._schedule = experiment.schedule
    self._batch_size = experiment.config.batch_size
    self._start_step = start_step
    self._pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.timer = progress.StepTimer(start_step)
    self.last: dict[str, float] = {}

  def add(self, step: int, metrics: dict[str, jax.Array],
          console: progress.ProgressBar) -> None:
    self._pending.append((step, metrics))
    if step == self._start_step + 1:
      jax.block_until_ready(metrics)
      console.first_step_done(step, self.timer.first_step_seconds())

  def check_finite(self) -> None:
    _check_finite(self._pending)

  def summarize(self, step: int) -> dict[str, float]:
    self.check_finite()
    host = jax.device_get([m for _, m in self._pending])
    self._pending.clear()
    scalars = {f"train/{k}": float(np.mean([m[k] for m in host]))
               for k in ("loss", "accuracy", "grad_norm")}
    scalars["train/learning_rate"] = float(self._schedule(step - 1))
    rate = self.timer.steps_per_second(step)
    if rate is not None:
      scalars["train/steps_per_second"] = rate
      scalars["train/images_per_second"] = rate * self._batch_size
    self.last = scalars
    return scalars


def evaluate(config, workdir: str, checkpoint_step: int | None = None
             ) -> dict[str, Any]:
  """Restores a checkpoint of ``workdir`` (the latest, or ``checkpoint_step``),
  evaluates it on ``config.eval_split`` and writes ``<workdir>/evaluation.json``.

  ``config=None`` uses the config saved in the workdir. The top-level metrics are
  those of the EMA weights when the run keeps an EMA (the paper's), else of the
  raw weights; both are in the file.
  """
  if not os.path.isdir(os.path.join(workdir, checkpointing.CHECKPOINT_DIR)):
    raise WorkdirError(
        f"workdir={workdir!r} holds no checkpoints to evaluate; train first with "
        f"`python train.py --config=... --workdir={workdir}`.")
  if config is None:
    saved = checkpointing.load_config_dict(workdir)
    if saved is None:
      raise WorkdirError(
          f"workdir={workdir!r} has no {checkpointing.CONFIG_FILE}; pass --config.")
    import ml_collections  # pylint: disable=g-import-not-at-top

    config = ml_collections.ConfigDict(saved).lock()
  experiment = Experiment(config, workdir)
  checkpointing.check_config_matches(workdir, config)
  with experiment.checkpointer(read_only=True) as checkpointer:
    steps = checkpointer.all_steps()
    if not steps:
      raise WorkdirError(
          f"workdir={workdir!r} holds no checkpoints to evaluate; train first.")
    abstract_state = experiment.abstract_state()
    if checkpoint_step is None:  # The newest readable one.
      step, state, _ = checkpointer.restore_latest(abstract_state)
    else:
      if checkpoint_step not in steps:
        raise ConfigError(f"--checkpoint_step={checkpoint_step}: no such checkpoint "
                          f"in {checkpointer.directory}; available steps: {steps}.")
      step = checkpoint_step
      checkpointer.check_compatible(step, abstract_state)
      state = checkpointer.restore_state(step, abstract_state)
  results = experiment.evaluate(state, experiment.source(config.eval_split),
                                experiment.jitted_eval_step())
  main = results.get("ema", results["params"])
  report = {"step": int(step), **main,
            "weights": "ema" if "ema" in results else "params",
            "model": config.model, "dataset": config.dataset,
            "split": config.eval_split, "metrics": results}
  if parallel.is_main_process():
    path = os.path.join(workdir, checkpointing.EVALUATION_FILE)
    checkpointing.write_json(path, report)
    print(_eval_line(step, results) + f"\nWrote {os.path.abspath(path)}", flush=True)
  return report


class _StopOnSigterm:
  """Turns SIGTERM (preemption, `kill`) into "checkpoint after this step and stop".

  With several processes all of them must stop at the same step: JAX's preemption
  sync point (``jax.distributed``'s preemption service catches SIGTERM), which Orbax's
  ``reached_preemption`` reads, decides.
  """

  def __init__(self, checkpointer: checkpointing.Checkpointer):
    self._checkpointer = checkpointer
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
    self._signalled = True

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


def _train_line(step: int, plan: run_plan.RunPlan, scalars: Mapping[str, float]) -> str:
  values = "  ".join(f"{k}={_format(v)}" for k, v in scalars.items())
  return (f"[step {step}/{plan.num_train_steps}, epoch {plan.epochs(step):.2f}] "
          f"{values}")


def _format(value: float) -> str:
  return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


def _eval_line(step: int, results: Mapping[str, Mapping[str, float]]) -> str:
  parts = []
  for name, m in results.items():
    top5 = f", top-5 {m['top5_accuracy']:.2%}" if "top5_accuracy" in m else ""
    weights = "EMA weights" if name == "ema" else "weights"
    parts.append(f"{weights}: loss {m['loss']:.4f}, top-1 {m['accuracy']:.2%}{top5} "
                 f"on {m['num_examples']} examples")
  return f"[step {step}] eval " + "; ".join(parts)

