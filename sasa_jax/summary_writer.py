"""One writer for metrics: TensorBoard event files (tensorboardX) and the console.

Only process 0 writes; other processes get a writer that does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from absl import logging


class MetricWriter:
  """Writes scalar summaries, with their step, to TensorBoard and the log."""

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    self.logdir = logdir
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      os.makedirs(logdir, exist_ok=True)
      self._writer = SummaryWriter(logdir=logdir)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for key, value in scalars.items():
      self._writer.add_scalar(key, float(value), global_step=step)
    logging.info("[%d] %s", step, ", ".join(
        f"{k}={_fmt(v)}" for k, v in sorted(scalars.items())))

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self._writer is not None:
      self._writer.add_text(tag, text, global_step=step)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _fmt(value: float) -> str:
  value = float(value)
  return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.1f}"
