"""Signals that stop a run, SIGTERM (preemption, ``kill``) and SIGINT (Ctrl-C): before it
has anything to save, exit at once, saying so; once it trains, checkpoint after the
current step, then stop.

Raising from a signal handler surfaces wherever the main thread is, possibly inside a
library that wraps it (an import turns it into an ``ImportError``); a run that has not
trained a step has nothing to lose, so it exits as the signal's default action does
(status 128 + the signal's number: 143, 130), with a message. Light (no JAX import):
``train.py`` installs :func:`exit_while_starting` before it imports JAX.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


def describe(signum: int) -> str:
  """``'SIGTERM'``, ``'Ctrl-C (SIGINT)'``."""
  return _NAMES.get(signum, signal.Signals(signum).name)


def _say(line: str) -> None:
  """Writes ``<program>: line`` to stderr, safely from a signal handler."""
  os.write(sys.stderr.fileno(), f"{os.path.basename(sys.argv[0])}: {line}\n".encode())


def exit_while_starting(signum: int = signal.SIGTERM, frame=None) -> None:
  """A signal handler: says that the run stopped before its first step, and exits with
  ``128 + signum``."""
  del frame
  _say(f"Stopped by {describe(signum)} while starting, before the first step (nothing "
       f"to save). Re-run the same command to start or resume.")
  os._exit(128 + signum)  # pylint: disable=protected-access


class StopOnSignals:
  """Turns SIGTERM and SIGINT (Ctrl-C) into a clean stop.

  Before ``training_started``, while the run sets up (dataset, lock, restore), there
  is nothing to save: the process exits at once (:func:`exit_while_starting`). From
  then on, the run checkpoints after the current step and stops (``requested``). A
  second Ctrl-C stops at once, without saving (``KeyboardInterrupt``).

  With several processes all of them must stop after the same step: JAX's preemption
  sync point decides (``jax.distributed``'s preemption service catches SIGTERM, and
  Orbax's ``reached_preemption`` reads it); Ctrl-C is passed on to it as a SIGTERM.
  """

  def __init__(self, num_processes: int):
    self._multiprocess = num_processes > 1
    self._checkpointer = None  # A Checkpointer, once training started.
    self.received: int | None = None  # The signal that asked to stop.
    self._previous = {}

  def __enter__(self) -> "StopOnSignals":
    if threading.current_thread() is threading.main_thread():
      # In several processes, SIGTERM belongs to JAX's preemption service.
      for signum in (signal.SIGINT,) if self._multiprocess else _NAMES:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    if self._checkpointer is None:
      exit_while_starting(signum)
    if signum == signal.SIGINT and self.received == signal.SIGINT:
      raise KeyboardInterrupt  # The second Ctrl-C: stop now.
    if self.received is None:
      _say(f"{describe(signum)}: stopping after the current step, with a checkpoint."
           + (" Ctrl-C again stops at once, without one." if signum == signal.SIGINT
              else ""))
    self.received = signum
    if self._multiprocess:  # All processes stop after the same step.
      os.kill(os.getpid(), signal.SIGTERM)

  def training_started(self, checkpointer) -> None:
    """From now on, a signal stops the run after the current step (see ``requested``)."""
    self._checkpointer = checkpointer

  def requested(self, step: int) -> bool:
    """Whether the run stops after ``step`` (collective with several processes)."""
    if self._multiprocess:
      return self._checkpointer.reached_preemption(step)
    return self.received is not None
