"""One run per workdir: an exclusive lock on ``<workdir>/lock``, held while a run lives.

The lock is ``fcntl.flock`` on that file, so the kernel releases it when the process
ends, however it ends (``kill -9`` included): the lock of a run that is gone is never
stale, and the file itself may stay. The file records the holder (pid, host, start
time, command) for the message a second run gets. With several processes
(``jax.distributed``) process 0 holds it for all of them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time

import jax
from absl import logging

from sasa_jax.errors import WorkdirError
from sasa_jax.workdir.layout import LOCK_FILE

# flock's answers on a filesystem that has no locks (some NFS and FUSE mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


class WorkdirLock:
  """``with WorkdirLock(workdir):`` holds the workdir's lock, or raises
  :class:`WorkdirError` naming the live process that holds it."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd: int | None = None

  def __enter__(self) -> "WorkdirLock":
    if jax.process_index() != 0:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      raise WorkdirError(
          f"workdir={self.workdir!r} is in use by another run: {self._holder()} holds "
          f"{self.path}. Wait for that run to end (or stop it), or use another "
          f"workdir.") from None
    except OSError as e:
      os.close(fd)
      if e.errno not in _NO_LOCKS:
        raise
      logging.warning("Cannot lock %s (%s): a second run started on this workdir "
                      "would not be stopped.", self.path, e.strerror)
      return self
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv)}).encode())
    self._fd = fd
    return self

  def _holder(self) -> str:
    """``'pid 123 on host h (since ...: python train.py ...)'``, from the lock file."""
    try:
      with open(self.path) as f:
        holder = json.load(f)
      return (f"pid {holder['pid']} on host {holder['host']} (since "
              f"{holder['started']}: {holder['command']})")
    except (OSError, ValueError, KeyError):  # Written a moment after it was locked.
      return "a process that is starting"

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None
