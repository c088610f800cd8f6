"""Learning-rate schedule and optimizer (Optax), built from the config.

Paper recipe (appendix): Nesterov momentum SGD, linear warm-up then cosine decay.
Weight decay is L2 added to the gradient for SGD (as in the reference ResNet
recipes) and decoupled for AdamW; in both cases it skips 1-D parameters (BatchNorm
scales and offsets, biases).
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from sasa_jax.training.run_plan import RunPlan


def create_learning_rate_schedule(config, plan: RunPlan) -> optax.Schedule:
  """Linear warm-up from 0 to the peak ``plan.learning_rate`` over
  ``plan.warmup_steps``, then cosine decay to 0 at ``plan.num_train_steps``
  (``config.lr_schedule='cosine'``) or constant."""
  peak, warmup_steps = plan.learning_rate, plan.warmup_steps
  if config.lr_schedule == "cosine":
    after = optax.cosine_decay_schedule(peak, max(plan.num_train_steps - warmup_steps, 1))
  else:
    after = optax.constant_schedule(peak)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True for parameters that are decayed: kernels and embeddings, not 1-D ones."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(config, schedule: optax.Schedule
                     ) -> optax.GradientTransformation:
  """SGD (Nesterov momentum) or AdamW, with optional global-norm clipping."""
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == "sgd":
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay,
                                             mask=weight_decay_mask))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=config.nesterov and config.momentum > 0))
  else:
    parts.append(optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                             weight_decay=config.weight_decay,
                             mask=weight_decay_mask))
  return optax.chain(*parts)
