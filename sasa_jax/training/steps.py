"""The train state and the pure step functions: ``create_train_state``, ``train_step``,
``eval_step``.

Both steps work on a global batch ``{'image': uint8 (B, H, W, C), 'label': int32 (B,)}``
(plus ``'mask'`` for evaluation), normalised on the device; under ``jax.jit`` with a
batch-sharded input the compiler adds the all-reduces, so BatchNorm statistics and the loss
are over the global batch. Per-step randomness is ``fold_in(key, step)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from sasa_jax.data import preprocessing


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` (step, params, optimizer state) plus BatchNorm
  statistics and, when ``ema_decay > 0``, an EMA of both (``ema``, else None)."""

  batch_stats: Any
  ema: Any


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
