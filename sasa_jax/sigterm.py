"""SIGTERM before a run has anything to save: exit at once, saying so.

Raising from a signal handler surfaces wherever the main thread is, possibly inside a
library that wraps it (an import turns it into an ``ImportError``); a run that has not
trained a step has nothing to lose, so it exits as SIGTERM's default action does
(status 143), with a message.
"""

from __future__ import annotations

import os
import signal
import sys

MESSAGE = ("Stopped by SIGTERM while starting, before the first step (nothing to "
           "save). Re-run the same command to start or resume.")


def exit_while_starting(signum: int = signal.SIGTERM, frame=None) -> None:
  """A SIGTERM handler: prints ``<program>: MESSAGE`` and exits with ``128 + signum``."""
  del frame
  os.write(sys.stderr.fileno(),
           f"{os.path.basename(sys.argv[0])}: {MESSAGE}\n".encode())
  os._exit(128 + signum)  # pylint: disable=protected-access
