"""``Experiment``: everything a run builds from its config before the first step.

Training (:mod:`~sasa_jax.training.loop`) and evaluation
(:mod:`~sasa_jax.training.evaluation`) are made of its pieces, and a notebook can use them
one at a time. Nothing is compiled when it is built: the config is checked, the dataset
opened, the model, optimizer and mesh created.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from sasa_jax import data, models
from sasa_jax.config import checks
from sasa_jax.distributed import mesh as mesh_lib
from sasa_jax.distributed import processes
from sasa_jax.errors import ConfigError
from sasa_jax.training import optimizers, run_plan, steps
from sasa_jax.workdir import layout

# ``config.compute_dtype`` -> the model's computation dtype (parameters stay float32).
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


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


class Experiment:
  """The pieces of a run, built from its config (nothing compiled).

  Methods: ``initial_state()`` / ``abstract_state()`` (the structure to restore a
  checkpoint onto), ``jitted_train_step()``, ``jitted_eval_step()`` (both run on the
  mesh, which they set as JAX's context mesh),
  ``evaluate_state(state, eval_step_fn)``, ``train_batches(start_step)``,
  ``eval_batches()``. Attributes: ``config``, ``workdir``, ``mesh``, ``dataset`` (the
  opened :class:`~sasa_jax.data.Dataset`), ``info`` (its ``DatasetInfo``), ``plan`` (the
  :class:`~sasa_jax.training.run_plan.RunPlan`: steps, intervals and peak learning rate
  derived from the config), ``model``, ``image_shape`` ``(H, W, C)``, ``schedule``,
  ``tx``, the ``replicated`` and ``data_sharding`` shardings, the ``init_key`` /
  ``step_key`` folded from ``config.seed`` and ``norm`` (the normalisation statistics).

  ``info`` and ``devices`` build the pieces without the data (``dataset`` is then None)
  on other devices than this process's, e.g. to compile a run's steps for TPU devices
  described without a TPU (``benchmarks.tpu``).
  """

  def __init__(self, config, workdir: str, *, info: data.DatasetInfo | None = None,
               devices=None):
    processes.check_same_config(config)  # Before anything else the config steers.
    checks.validate_config(config)
    layout.check_workdir(workdir)
    self.config = config
    self.workdir = workdir
    self.mesh = mesh_lib.create_mesh(devices)
    for key in ("batch_size", "eval_batch_size"):
      mesh_lib.check_batch_size(key, config[key], self.mesh.size,
                                f"devices ({self.mesh.size} over "
                                f"{jax.process_count()} process(es))")
    self.dataset = None if info else data.open_dataset(config)
    self.info = info or self.dataset.info
    checks.check_channels(config, self.info.num_channels)
    _check_image_size(config, self.info)
    self.model = create_model(config, self.info.num_classes)
    self.image_shape = (config.image_size, config.image_size, self.info.num_channels)
    self.plan = run_plan.create_run_plan(config, self.info.num_train_examples)
    self.schedule = optimizers.create_learning_rate_schedule(config, self.plan)
    self.tx = optimizers.create_optimizer(config, self.schedule)
    self.replicated = mesh_lib.replicated(self.mesh)
    self.data_sharding = mesh_lib.data_sharded(self.mesh)
    root = jax.random.key(config.seed)
    self.init_key = jax.random.fold_in(root, 0)
    self.step_key = jax.random.fold_in(root, 1)
    self.norm = dict(mean=tuple(config.normalization_mean),
                     std=tuple(config.normalization_std))
    # Shapes only (nothing allocated): the model checks its input, as a run would.
    try:
      self._abstract_state = jax.eval_shape(self._init_fn(), self.init_key)
    except ValueError as e:
      raise ConfigError(f"config.model={config.model!r} cannot take "
                        f"{config.image_size}x{config.image_size} images "
                        f"(config.image_size): {e}") from e

  def _init_fn(self):
    return functools.partial(steps.create_train_state, config=self.config,
                             model=self.model, image_shape=self.image_shape, tx=self.tx)

  def abstract_state(self) -> steps.TrainState:
    return mesh_lib.with_sharding(self._abstract_state, self.replicated)

  def initial_state(self) -> steps.TrainState:
    return jax.jit(self._init_fn(), out_shardings=self.replicated)(self.init_key)

  def jitted_train_step(self) -> mesh_lib.OnMesh:
    """``train_step`` with this run's settings, jitted; donates the input state."""
    fn = functools.partial(steps.train_step, key=self.step_key,
                           num_classes=self.info.num_classes,
                           label_smoothing=self.config.label_smoothing,
                           ema_decay=self.config.ema_decay,
                           ema_warmup=self.config.ema_warmup, **self.norm)
    return mesh_lib.OnMesh(jax.jit(fn, out_shardings=(self.replicated, self.replicated),
                                   donate_argnums=(0,)), self.mesh)

  def jitted_eval_step(self) -> mesh_lib.OnMesh:
    fn = functools.partial(steps.eval_step, apply_fn=self.model.apply,
                           num_classes=self.info.num_classes, **self.norm)
    return mesh_lib.OnMesh(jax.jit(fn, out_shardings=self.replicated), self.mesh)

  @contextlib.contextmanager
  def train_batches(self, start_step: int) -> Iterator[Iterator[dict[str, jax.Array]]]:
    """Global training batches (sharded over the devices) from ``start_step`` on."""
    host_batches = data.train_iterator(self.dataset.source(self.config.train_split),
                                       self.config, start_step=start_step, info=self.info)
    try:
      yield (mesh_lib.global_batch(b, self.data_sharding) for b in host_batches)
    finally:
      data.close(host_batches)

  def eval_batches(self) -> Iterator[dict[str, jax.Array]]:
    """One pass over the eval split: global batches with a ``mask`` of the real rows."""
    host_batches = data.eval_iterator(self.dataset.source(self.config.eval_split),
                                      self.config, info=self.info)
    return (mesh_lib.global_batch(b, self.data_sharding) for b in host_batches)

  def evaluate_state(self, state: steps.TrainState, eval_step_fn
                     ) -> dict[str, dict[str, float]]:
    """Metrics of the raw weights (``'params'``) and, if kept, the EMA (``'ema'``)."""
    weights = {"params": {"params": state.params, "batch_stats": state.batch_stats}}
    if state.ema is not None:
      weights["ema"] = state.ema
    return {name: evaluate_batches(eval_step_fn, variables, self.eval_batches())
            for name, variables in weights.items()}


def _check_image_size(config, info: data.DatasetInfo) -> None:
  """``config.image_size`` must be the dataset's where the preprocessing keeps the size
  (a ``ConfigError`` before anything is allocated)."""
  if info.image_size is None or info.image_size == (config.image_size,) * 2:
    return
  keeping = [f"config.{key}={config[key]!r}" for key, keeps in (
      ("augmentation", config.augmentation not in ("inception",)),
      ("eval_preprocessing", config.eval_preprocessing == "none")) if keeps]
  if keeping:
    height, width = info.image_size
    raise ConfigError(
        f"config.image_size={config.image_size}, but dataset {info.name!r} holds "
        f"{height}x{width} images and {' and '.join(keeping)} keep their size. Set "
        f"config.image_size={height}, or resize them (augmentation='inception', "
        f"eval_preprocessing='center_crop').")


def evaluate_batches(eval_step_fn, variables: Any, batches: Iterator[dict[str, jax.Array]]
                     ) -> dict[str, float]:
  """Runs the jitted ``eval_step_fn`` over global ``batches``; averages on the host at
  the end: ``{'loss', 'accuracy', 'num_examples'[, 'top5_accuracy']}``."""
  totals = None
  for batch in batches:
    sums = eval_step_fn(variables, batch)
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
