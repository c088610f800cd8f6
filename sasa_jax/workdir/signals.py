"""Signals that stop a run: before it has anything to save, exit at once, saying so;
once it trains, checkpoint after the current step, then stop.

Raising from a signal handler surfaces wherever the main thread is, possibly inside a
library that wraps it (an import turns it into an ``ImportError``); a run that has not
trained a step has nothing to lose, so it exits as SIGTERM's default action does
(status 143), with a message.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

MESSAGE = ("Stopped by SIGTERM while starting, before the first step (nothing to "
           "save). Re-run the same command to start or resume.")


def exit_while_starting(signum: int = signal.SIGTERM, frame=None) -> None:
  """A SIGTERM handler: prints ``<program>: MESSAGE`` and exits with ``128 + signum``."""
  del frame
  os.write(sys.stderr.fileno(),
           f"{os.path.basename(sys.argv[0])}: {MESSAGE}\n".encode())
  os._exit(128 + signum)  # pylint: disable=protected-access


class StopOnSigterm:
  """Turns SIGTERM (preemption, `kill`) into a clean stop.

  Before ``training_started``, while the run sets up (dataset, lock, restore), there
  is nothing to save: the process exits at once (:func:`exit_while_starting`).
  From then on, the run checkpoints after the current step and stops. With several
  processes all of them must stop at the same step: JAX's preemption sync point
  (``jax.distributed``'s preemption service catches SIGTERM), which Orbax's
  ``reached_preemption`` reads, decides.

  Light (no JAX import): ``train.py`` installs :func:`exit_while_starting` before it
  imports JAX.
  """

  def __init__(self, num_processes: int):
    self._multiprocess = num_processes > 1
    self._checkpointer = None  # A Checkpointer, once training started.
    self._signalled = False
    self._previous = None

  def __enter__(self) -> "StopOnSigterm":
    if not self._multiprocess and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self._checkpointer is None:
      exit_while_starting()
    self._signalled = True

  def training_started(self, checkpointer) -> None:
    """From now on, a SIGTERM stops after the current step (see ``requested``)."""
    self._checkpointer = checkpointer

  def requested(self, step: int) -> bool:
    if self._multiprocess:
      return self._checkpointer.reached_preemption(step)
    return self._signalled
