"""The training loop, in the mould of Flax's ``examples/imagenet``.

Read in this order:

* :mod:`~sasa_jax.training.steps`: ``TrainState``, ``create_train_state`` and the pure,
  jitted ``train_step`` and ``eval_step``;
* :mod:`~sasa_jax.training.experiment`: ``Experiment``, the pieces a run builds from its
  config (dataset, model, optimizer, mesh, keys), and ``evaluate_batches``;
* :mod:`~sasa_jax.training.loop`: ``train_and_evaluate``, resumable;
* :mod:`~sasa_jax.training.evaluation`: ``evaluate_checkpoint`` (``--mode=evaluate``);
* beside them: the learning-rate schedule and optimizer (``optimizers``), the run's
  length in steps (``run_plan``), and what a run reports (``reporting``, with the
  ``console`` and ``tensorboard``).

Data parallel over every device of every host with ``jax.jit`` on a 1-D mesh
(:mod:`sasa_jax.distributed.mesh`); checkpoints, the workdir's lock and signals are in
:mod:`sasa_jax.workdir`.
"""

from sasa_jax.training.evaluation import evaluate_checkpoint
from sasa_jax.training.experiment import Experiment, create_model, evaluate_batches
from sasa_jax.training.loop import data_position, restore_or_initialize, train_and_evaluate
from sasa_jax.training.steps import (TrainState, create_train_state, cross_entropy_loss,
                                     ema_decay_at, eval_step, train_step)

__all__ = [
    "Experiment", "TrainState", "create_model", "create_train_state", "cross_entropy_loss",
    "data_position", "ema_decay_at", "eval_step", "evaluate_batches", "evaluate_checkpoint",
    "restore_or_initialize", "train_and_evaluate", "train_step"
]
