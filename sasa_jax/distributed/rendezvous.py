"""Before ``jax.distributed`` starts: the processes check that their settings agree.

Started with settings that disagree, ``jax.distributed.initialize`` hangs or worse: with
a count of 3 on process 0 and 2 on process 1 both wait silently for 5 minutes, then abort
in C++; with the counts the other way round both train, unnoticed; of two processes 0 one
aborts and the other waits until it is killed. This exchange comes first, over the
coordinator's own address: process 0 listens on it, every other process connects and
says its count and its id, and process 0 answers each with the verdict. Every process
then either ends with one line naming the setting that disagrees (and on which
processes), or goes on to start ``jax.distributed`` on the same port, which process 0
has closed. Processes that do not all arrive within ``timeout`` seconds stop too, naming
those missing.

Only for explicit settings (flags or ``JAX_*`` variables): on the clusters JAX detects
(Cloud TPU, SLURM, ...) the cluster gives every process consistent ones.
"""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import time

from sasa_jax.distributed.settings import Settings
from sasa_jax.errors import ConfigError

# How long a process waits for the others to start: JAX's own initialization timeout.
DEFAULT_TIMEOUT_SECONDS = 300
_POLL_SECONDS = 0.2


def check_settings_agree(s: Settings, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> None:
  """Raises :class:`ConfigError`, on every process, if the processes' counts disagree,
  an id is taken twice or out of range, or not all of them arrive within ``timeout``."""
  host, port = _address(s.coordinator_address)
  deadline = time.monotonic() + timeout
  if s.process_id == 0:
    try:
      server = socket.create_server(("", port), reuse_port=False)
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        raise ConfigError(f"{s.describe('coordinator_address')}: process 0 cannot listen "
                          f"on port {port}: {e.strerror}.") from e
      # Another process listens there: most likely another process 0. Say so to it.
      _ask(s, host, port, deadline)
      raise ConfigError(f"{s.describe('coordinator_address')}: port {port} is in use "
                        f"by a process that is not a process 0 of this run.") from e
    with server:
      _collect(s, server, deadline)
  else:
    _ask(s, host, port, deadline)


def _address(coordinator_address: str) -> tuple[str, int]:
  host, _, port = coordinator_address.rpartition(":")
  return host.strip("[]"), int(port)


def _hello(s: Settings) -> dict:
  return {"process_id": s.process_id, "num_processes": s.num_processes,
          "process_id_setting": s.describe("process_id"),
          "num_processes_setting": s.describe("num_processes"),
          "host": socket.gethostname()}


def _ask(s: Settings, host: str, port: int, deadline: float) -> None:
  """A process other than 0: says its settings to process 0 and waits for the verdict."""
  connection = None
  while connection is None:
    try:
      connection = socket.create_connection((host, port), timeout=_POLL_SECONDS * 5)
    except OSError:
      if time.monotonic() > deadline:
        raise ConfigError(
            f"{s.describe('coordinator_address')}: process 0 did not answer there within "
            f"{DEFAULT_TIMEOUT_SECONDS} s. Start it (JAX_PROCESS_ID=0) on that host, with "
            f"the same address.") from None
      time.sleep(_POLL_SECONDS)
  with connection:
    connection.settimeout(max(1.0, deadline - time.monotonic()))
    try:
      connection.sendall((json.dumps(_hello(s)) + "\n").encode())
      verdict = json.loads(connection.makefile().readline() or "null")
    except (OSError, ValueError):
      verdict = None
  if verdict is None:
    raise ConfigError(f"{s.describe('coordinator_address')}: process 0 stopped before it "
                      f"heard from all processes (see its error).")
  if "error" in verdict:
    raise ConfigError(verdict["error"])


def _collect(s: Settings, server: socket.socket, deadline: float) -> None:
  """Process 0: hears every other process, then gives each the verdict."""
  server.settimeout(_POLL_SECONDS)
  peers: dict[int, tuple[socket.socket, dict]] = {}
  error = None
  try:
    while error is None and len(peers) < s.num_processes - 1:
      if time.monotonic() > deadline:
        missing = sorted(set(range(1, s.num_processes)) - set(peers))
        error = (f"Processes {missing} of {s.num_processes} "
                 f"({s.describe('num_processes')} on process 0) did not connect to "
                 f"{s.describe('coordinator_address')} within {DEFAULT_TIMEOUT_SECONDS} s. "
                 f"Start every process, each with its own id 0 to {s.num_processes - 1}.")
        break
      try:
        connection, _ = server.accept()
      except socket.timeout:
        continue
      connection.settimeout(_POLL_SECONDS * 25)
      try:
        hello = json.loads(connection.makefile().readline())
      except (OSError, ValueError):
        connection.close()  # Not one of ours.
        continue
      error = _disagreement(s, hello, peers)
      peers.setdefault(hello["process_id"], (connection, hello))
      if error is not None and peers[hello["process_id"]][0] is not connection:
        _send(connection, {"error": error})
        connection.close()
  finally:
    verdict = {"error": error} if error else {"ok": True}
    for connection, _ in peers.values():
      _send(connection, verdict)
      connection.close()
  if error is not None:
    raise ConfigError(error)


def _disagreement(s: Settings, hello: dict, peers: dict) -> str | None:
  """What is wrong with the settings in ``hello`` (another process's), or None."""
  where = f"process {hello['process_id']} (host {hello['host']})"
  if hello["num_processes"] != s.num_processes:
    return (f"The processes disagree on the number of processes: "
            f"{s.describe('num_processes')} on process 0, "
            f"{hello['num_processes_setting']} on {where}. Give every process the same.")
  if hello["process_id"] == 0 or hello["process_id"] in peers:
    return (f"Two processes have the process id {hello['process_id']} "
            f"({hello['process_id_setting']}, the second on host {hello['host']}): each "
            f"of the {s.num_processes} processes needs its own id, 0 to "
            f"{s.num_processes - 1}.")
  return None


def _send(connection: socket.socket, message: dict) -> None:
  with contextlib.suppress(OSError):
    connection.sendall((json.dumps(message) + "\n").encode())
