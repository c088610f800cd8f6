"""The settings of a multi-process run: where the coordinator is, how many processes, which
one this is, and how long the others wait for a lost one.

They come from flags (``train.py --coordinator_address=... --num_processes=...
--process_id=...``) or, where a flag is not given, the environment variables
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; settings given
neither way are left to the cluster JAX detects (Cloud TPU, SLURM, Open MPI, Kubernetes).
:func:`settings` checks each value on its own, before anything touches a device.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from sasa_jax.errors import ConfigError

# setting -> the environment variable it is read from when not given explicitly.
ENVIRONMENT = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
WHAT = {"coordinator_address": "the coordinator address",
         "num_processes": "the number of processes", "process_id": "the process id"}
# jax.distributed's default heartbeat timeout: a lost process stops the others in 100 s.
DEFAULT_PROCESS_TIMEOUT_SECONDS = 100


@dataclasses.dataclass(frozen=True)
class Settings:
  """What ``jax.distributed.initialize`` is given; None: detected from the cluster.

  Attributes:
    coordinator_address: ``host:port`` of process 0's coordinator, the same for all.
    num_processes: how many processes the run has (>= 1).
    process_id: this process's id in ``[0, num_processes)``.
    process_timeout_seconds: how long the others wait for a process that is lost
      (no heartbeat) before they stop too; a process that stops with an error waits
      twice as long for the others at the shutdown barrier.
    sources: for messages, where each value came from (``'--num_processes'`` or
      ``'JAX_NUM_PROCESSES'``).
  """

  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  process_timeout_seconds: int = DEFAULT_PROCESS_TIMEOUT_SECONDS
  sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

  def describe(self, name: str) -> str:
    """A given setting as the user wrote it: ``"JAX_NUM_PROCESSES=2"``, ``"--process_id=0"``."""
    return f"{self.sources[name]}={getattr(self, name)}"


def settings(*, coordinator_address: str | None = None, num_processes: int | None = None,
             process_id: int | None = None,
             process_timeout_seconds: int | None = None,
             environ: Mapping[str, str] | None = None) -> Settings:
  """The settings from the given values (flags) and, for those that are None, the
  environment (``process_timeout_seconds``: the default). Raises :class:`ConfigError`
  for a value that cannot be right (not an integer, a count below 1, an id outside
  ``[0, count)``, an address without a port); before anything touches a device."""
  environ = os.environ if environ is None else environ
  values, sources = {}, {}
  for name, value in (("coordinator_address", coordinator_address),
                      ("num_processes", num_processes), ("process_id", process_id)):
    sources[name] = f"--{name}"
    if value is None and environ.get(ENVIRONMENT[name], "").strip():
      value, sources[name] = environ[ENVIRONMENT[name]].strip(), ENVIRONMENT[name]
    if value is not None and name != "coordinator_address":
      value = _as_int(value, sources[name])
    values[name] = value
  result = Settings(**values, sources=sources, process_timeout_seconds=(
      DEFAULT_PROCESS_TIMEOUT_SECONDS if process_timeout_seconds is None
      else process_timeout_seconds))
  _check(result)
  return result


def _as_int(value: Any, source: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{source}={value!r} is not an integer.") from None


def _check(s: Settings) -> None:
  if s.num_processes is not None and s.num_processes < 1:
    raise ConfigError(f"{s.describe('num_processes')}: the number of processes must be "
                      f"at least 1.")
  if s.process_id is not None and s.process_id < 0:
    raise ConfigError(f"{s.describe('process_id')}: process ids are 0, 1, ..., "
                      f"number of processes - 1.")
  if (s.process_id is not None and s.num_processes is not None
      and s.process_id >= s.num_processes):
    raise ConfigError(
        f"{s.describe('process_id')} with {s.describe('num_processes')}: process ids "
        f"are 0 to {s.num_processes - 1}.")
  if s.coordinator_address is not None:
    host, _, port = s.coordinator_address.rpartition(":")
    if not host or not port.isdigit():
      raise ConfigError(f"{s.describe('coordinator_address')}: expected host:port "
                        f"(process 0's host and a free port, e.g. 10.0.0.1:1234).")
  if s.process_timeout_seconds < 1:
    raise ConfigError(f"--process_timeout_seconds={s.process_timeout_seconds}: "
                      f"must be at least 1.")
