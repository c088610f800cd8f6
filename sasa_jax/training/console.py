"""The console of a training run: a progress bar, and metric and log lines above it.

On process 0 a tqdm bar shows the step, the ETA, images/s and the loss. It starts
after the first (compiling) step, whose time is reported once on its own, so that
the ETA is not skewed by compilation. Every line printed while the bar is up (the
metric lines, and absl log lines, which are redirected) goes above the bar instead
of being glued onto it. On a terminal-less stream (a log file, CI) the bar is off
and only the lines are printed.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from absl import logging
from tqdm import tqdm


class _AboveTheBar:
  """A text stream that writes through ``tqdm.write``: above any open bar."""

  def __init__(self, stream: TextIO):
    self._stream = stream

  def write(self, text: str) -> int:
    tqdm.write(text, file=self._stream, end="")
    return len(text)

  def flush(self) -> None:
    self._stream.flush()


@contextlib.contextmanager
def absl_logs_above_the_bar() -> Iterator[None]:
  """Routes absl's log lines through ``tqdm.write`` while the context is open."""
  handler = logging.get_absl_handler().python_handler
  previous = handler.stream
  handler.stream = _AboveTheBar(previous)
  try:
    yield
  finally:
    handler.stream = previous


class ProgressBar:
  """The bar of steps ``start_step + 1 .. num_steps`` and the lines above it.

  ``first_step_done(seconds)`` reports the compile time and opens the bar;
  ``update(step, loss=..., images_per_second=...)`` moves it; ``write(line)`` prints a
  line above it. Disabled (nothing printed) when ``enabled`` is False.
  """

  def __init__(self, start_step: int, num_steps: int, *, enabled: bool = True,
               file: TextIO | None = None):
    self._start_step = start_step
    self._num_steps = num_steps
    self._enabled = enabled
    self._file = file or sys.stderr
    self._bar: tqdm | None = None
    self._postfix: dict[str, str] = {}
    self._logs = contextlib.ExitStack()

  def __enter__(self) -> "ProgressBar":
    if self._enabled:
      self._logs.enter_context(absl_logs_above_the_bar())
    return self

  def __exit__(self, *exc) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    self._logs.close()

  def first_step_done(self, step: int, seconds: float) -> None:
    """Reports the first step's time (compilation) and opens the bar after it."""
    if not self._enabled:
      return
    self.write(f"Step {step} (compiling the train step) took {seconds:.1f} s.")
    # disable=None: no bar unless the stream is a terminal.
    self._bar = tqdm(total=self._num_steps, initial=step, unit="step", desc="train",
                     file=self._file, dynamic_ncols=True, disable=None,
                     bar_format="{desc} {n_fmt}/{total_fmt} {bar} {percentage:3.0f}% "
                                "[{elapsed}<{remaining}, {rate_fmt}{postfix}]")

  def update(self, step: int, *, loss: float | None = None,
             images_per_second: float | None = None) -> None:
    """Moves the bar to ``step``; shows the latest loss and throughput if given."""
    if self._bar is None:
      return
    if loss is not None:
      self._postfix["loss"] = f"{loss:.4f}"
    if images_per_second is not None:
      self._postfix["img/s"] = f"{images_per_second:,.0f}"
    if loss is not None or images_per_second is not None:
      self._bar.set_postfix(self._postfix, refresh=False)
    self._bar.update(step - self._bar.n)

  def write(self, line: str) -> None:
    """Prints ``line`` (to stdout) above the bar."""
    if self._enabled:
      tqdm.write(line, file=sys.stdout)
      sys.stdout.flush()


class StepTimer:
  """Training throughput, leaving out the first (compiling) step and evaluations.

  ``steps_per_second(step)`` is the rate since the previous call (or since the end of
  the first step); time spent inside ``paused()`` does not count.
  """

  def __init__(self, start_step: int):
    self._step = start_step
    self._start = time.perf_counter()

  def first_step_seconds(self) -> float:
    """Seconds since construction, and restarts the clock at the current step."""
    seconds = time.perf_counter() - self._start
    self._step += 1
    self._start = time.perf_counter()
    return seconds

  def steps_per_second(self, step: int) -> float | None:
    """The rate since the last call; None if no step was timed."""
    elapsed = time.perf_counter() - self._start
    rate = (step - self._step) / elapsed if step > self._step and elapsed > 0 else None
    self._step, self._start = step, time.perf_counter()
    return rate

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    paused_at = time.perf_counter()
    try:
      yield
    finally:
      self._start += time.perf_counter() - paused_at
