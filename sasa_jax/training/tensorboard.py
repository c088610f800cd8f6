"""TensorBoard event files (tensorboardX, no TensorFlow needed) for a run's metrics.

Only process 0 writes; other processes get a writer that does nothing. The event file
is created at the first write, so a resumed run with nothing left to log adds no empty
file; a resumed run purges the events after its start step that the interrupted run
had logged past its last checkpoint (TensorBoard's ``purge_step``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from absl import logging

from sasa_jax.errors import WorkdirError


class MetricWriter:
  """Writes scalar and text summaries, with their step, to ``logdir``."""

  def __init__(self, logdir: str, *, start_step: int = 0, enabled: bool = True):
    self.logdir = logdir
    self._start_step = start_step
    self._enabled = enabled
    self._writer = None

  def _summary_writer(self):
    if self._writer is None:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      os.makedirs(self.logdir, exist_ok=True)
      self._writer = SummaryWriter(
          logdir=self.logdir, purge_step=self._start_step + 1 if self._start_step else None)
    return self._writer

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    writer = self._summary_writer()
    for key, value in scalars.items():
      writer.add_scalar(key, float(value), global_step=step)

  def write_text(self, step: int, tag: str, text: str) -> None:
    if self._enabled:
      self._summary_writer().add_text(tag, text, global_step=step)

  def close(self) -> None:
    """Writes the pending events; raises :class:`WorkdirError` if the disk refuses."""
    writer, self._writer = self._writer, None
    if writer is None:
      return
    try:
      writer.close()
    except OSError as e:
      raise WorkdirError(f"Writing the TensorBoard events to {self.logdir} failed: "
                         f"{e.strerror}.") from e

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      self.close()
    except WorkdirError as e:
      if exc is None:
        raise
      logging.warning("%s", e)  # The error that stopped the run comes first.
