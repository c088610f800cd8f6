"""What Orbax and TensorStore say when reading or writing fails, made readable.

Neither library gives its failures a type or an attribute to read the cause from: the
operating-system error and the file are in TensorStore's message text, after which both
libraries append the TensorStore spec (hundreds of lines). This module is the one place
that reads their text; ``tests/test_library_messages.py`` holds each reading against the
installed versions with real failures.
"""

from __future__ import annotations

import inspect
import os
import re
import sys

from sasa_jax.errors import TrainingInterrupted


def describe_error(error: BaseException) -> str:
  """The innermost cause of ``error`` in one line, without the TensorStore spec; an
  operating-system error inside a TensorStore message as ``'<strerror> (<file>)'``."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
  os_error = re.search(r"os_error_code='?(\d+)", text)
  text = text.split(" [tensorstore_spec=")[0].split(" See full TensorStore details")[0]
  if os_error:
    files = re.findall(r'"(/[^"]+)"', text)
    return os.strerror(int(os_error[1])) + (f" ({files[-1]})" if files else "")
  line = (text.strip().splitlines() or [type(error).__name__])[0].rstrip(".")
  return line if len(line) <= 500 else line[:500] + " ..."


def raise_interruption(error: BaseException) -> None:
  """Re-raises a Ctrl-C or SIGTERM that Orbax wrapped in its own exception while
  reading: that is no damage."""
  cause = error
  while cause is not None:
    if isinstance(cause, (KeyboardInterrupt, TrainingInterrupted)):
      raise cause
    cause = cause.__cause__ or cause.__context__


_dropping_abandoned_reads = False


def drop_reports_of_abandoned_reads() -> None:
  """Keeps Orbax's abandoned reads of a damaged checkpoint off the console, for good.

  When one array fails to read, Orbax stops waiting for the others and closes its
  event loop: their coroutines, closed at garbage collection, and TensorStore's reads
  completing later (on the closed loop) print dozens of "Exception ignored in ..."
  tracebacks ("Event loop is closed"), at any time afterwards. Installed once per
  process; every other unraisable exception still reaches the hook before.
  """
  global _dropping_abandoned_reads
  if _dropping_abandoned_reads:
    return
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    if not _abandoned_read(unraisable):
      previous(unraisable)

  sys.unraisablehook = hook
  _dropping_abandoned_reads = True


def _abandoned_read(unraisable) -> bool:
  if inspect.iscoroutine(unraisable.object):
    return f"{os.sep}orbax{os.sep}" in unraisable.object.cr_code.co_filename
  return (unraisable.object is None and isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == "Event loop is closed")
