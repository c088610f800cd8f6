"""A run's length, intervals and peak learning rate, derived from its config.

Configs state the run in epochs of the train split and the learning rate per
``base_batch_size`` images, so that one recipe means the same at any batch size:

* ``num_train_steps``, ``warmup_steps``, ``eval_every_steps``,
  ``checkpoint_every_steps`` = ``round(<key's epochs> * N / batch_size)`` (the intervals
  at least 1),
* ``peak learning rate = base_learning_rate * batch_size / base_batch_size``,

with ``N`` the train split's size. A ``*_steps`` key that is set overrides its
epochs (quick runs and tests).
"""

from __future__ import annotations

import dataclasses
import functools


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """What the loop runs: steps, intervals (in steps) and the peak learning rate."""

  num_train_examples: int
  batch_size: int
  num_train_steps: int
  warmup_steps: int
  eval_every_steps: int
  checkpoint_every_steps: int
  learning_rate: float

  @property
  def steps_per_epoch(self) -> float:
    return self.num_train_examples / self.batch_size

  def epochs(self, steps: int) -> float:
    """``steps`` in epochs of the train split."""
    return steps / self.steps_per_epoch

  def describe(self) -> str:
    """One line for the start of a run."""
    return (f"{self.num_train_steps} steps ({self.epochs(self.num_train_steps):.4g} "
            f"epochs of {self.num_train_examples} examples at batch {self.batch_size}), "
            f"warm-up {self.warmup_steps} steps ({self.epochs(self.warmup_steps):.3g} "
            f"epochs), peak learning rate {self.learning_rate:.4g}; eval every "
            f"{self.eval_every_steps} steps, checkpoint every "
            f"{self.checkpoint_every_steps} steps")


def _steps(config, steps_key: str, epochs_key: str, num_train_examples: int) -> int:
  """``config[steps_key]`` if set, else ``config[epochs_key]`` epochs in steps."""
  steps = config[steps_key]
  if steps is not None:
    return int(steps)
  return round(config[epochs_key] * num_train_examples / config.batch_size)


def create_run_plan(config, num_train_examples: int) -> RunPlan:
  """The :class:`RunPlan` of ``config`` on a train split of ``num_train_examples``."""
  steps = functools.partial(_steps, config, num_train_examples=num_train_examples)
  return RunPlan(
      num_train_examples=num_train_examples,
      batch_size=config.batch_size,
      num_train_steps=steps("num_train_steps", "num_epochs"),
      warmup_steps=steps("warmup_steps", "warmup_epochs"),
      eval_every_steps=max(1, steps("eval_every_steps", "eval_every_epochs")),
      checkpoint_every_steps=max(1, steps("checkpoint_every_steps",
                                          "checkpoint_every_epochs")),
      learning_rate=config.base_learning_rate * config.batch_size / config.base_batch_size,
  )
