"""Multi-process runs: starting ``jax.distributed`` and checking that the processes agree.

One process per host (or per group of devices) runs the same program; ``jax.distributed``
connects them to process 0's coordinator, after which ``jax.devices()`` lists the
devices of every process and the train step's collectives span all of them.

Where the processes come from:

* On the clusters JAX detects by itself (Cloud TPU, SLURM, Open MPI, Kubernetes) nothing
  needs to be set: the coordinator address, the number of processes and each one's id
  come from the cluster.
* Everywhere else they are explicit, the same on every process except the id: flags
  (``train.py --coordinator_address=... --num_processes=... --process_id=...``) or,
  where a flag is not given, the environment variables ``JAX_COORDINATOR_ADDRESS``,
  ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``. Explicit values win over detected ones.

Faults: every process sends heartbeats to the coordinator. When one is lost (killed, its
host down) and has been silent for ``process_timeout_seconds``, JAX stops all the others
("The following tasks are unhealthy (stopped sending heartbeats): <process ids>", exit
status 134); when the coordinator itself (process 0) is lost, the others stop at once
("the leader task ... died"). A process that stops with an error waits for the others at
JAX's shutdown barrier for at most twice that time, then all stop: longer than the
heartbeat timeout, so that a lost process is always named by the heartbeat check rather
than reported as a barrier timeout. Re-running every process resumes from the last
complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging

from sasa_jax import config_validation
from sasa_jax import parallel
from sasa_jax.errors import ConfigError

# setting -> the environment variable it is read from when not given explicitly.
ENVIRONMENT = {
    "coordinator_address": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}
_WHAT = {"coordinator_address": "the coordinator address",
         "num_processes": "the number of processes", "process_id": "the process id"}
# jax.distributed's default heartbeat timeout: a lost process stops the others in 100 s.
DEFAULT_PROCESS_TIMEOUT_SECONDS = 100
# Config keys that describe a host rather than the run: they may differ between
# processes (each host may keep the data elsewhere, or have other cores).
HOST_LOCAL_KEYS = frozenset({"data_dir", "data_workers", "data_threads", "data_prefetch"})


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


def initialize(s: Settings) -> None:
  """Starts ``jax.distributed`` (before anything touches a device).

  On CPU, collectives across processes use gloo (``jax_cpu_collectives_implementation``).
  Settings that are not given are detected from the cluster; if JAX finds no cluster to
  complete them, raises :class:`ConfigError` naming the missing ones.
  """
  if _runs_on_cpu():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  missing = [n for n in ENVIRONMENT if getattr(s, n) is None]
  try:
    jax.distributed.initialize(
        s.coordinator_address, s.num_processes, s.process_id,
        heartbeat_timeout_seconds=s.process_timeout_seconds,
        shutdown_timeout_seconds=2 * s.process_timeout_seconds)
  except ValueError as e:  # JAX's "... must be defined": no cluster completed them.
    if not missing:
      raise
    listed = [f"{_WHAT[n]} (--{n} or {ENVIRONMENT[n]})" for n in missing]
    listed = ", ".join(listed[:-1]) + " and " + listed[-1] if len(listed) > 1 else listed[0]
    one = len(missing) == 1
    given = ", ".join(s.describe(n) for n in ENVIRONMENT if n not in missing)
    raise ConfigError(
        f"--multihost: {listed} {'is' if one else 'are'} not set, and JAX detected no "
        f"cluster (Cloud TPU, SLURM, Open MPI, Kubernetes) to take "
        f"{'it' if one else 'them'} from. Set {'it' if one else 'them'} for every "
        f"process" + (f" (given: {given})." if given else ".")) from e
  logging.info("jax.distributed: process %d of %d, %d local device(s) of %d; a lost or "
               "failed process stops the others within %d s.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               s.process_timeout_seconds)


def _runs_on_cpu() -> bool:
  """Whether the backend will be the CPU: ``JAX_PLATFORMS`` lists it first, or is unset
  (then JAX takes an accelerator if it finds one; gloo only serves the CPU client)."""
  platforms = jax.config.jax_platforms
  return not platforms or platforms.split(",")[0].strip() == "cpu"


def check_same_config(config) -> None:
  """Raises :class:`ConfigError`, on every process, if the processes were started with
  different configs (apart from :data:`HOST_LOCAL_KEYS`), listing each differing key's
  value on every process. A no-op in a single process.

  Collective: every process must call it, before anything that depends on the config
  (a process with another batch size would otherwise wait for the others forever).
  """
  if jax.process_count() == 1:
    return
  mine = {k: v for k, v in config_validation.config_to_dict(config).items()
          if k not in HOST_LOCAL_KEYS}
  configs = _gather_json(mine)
  differences = config_validation.config_differences(*configs)
  if differences:
    lines = "\n".join(
        f"  {key}: " + ", ".join(f"{value!r} on process {p}" for p, value in
                                 enumerate(values))
        for key, values in differences.items())
    raise ConfigError(
        f"The {len(configs)} processes were started with different configs:\n{lines}\n"
        f"Start every process with the same --config and overrides (only "
        f"{', '.join(sorted(HOST_LOCAL_KEYS))} may differ).")


def _gather_json(obj: Any) -> list[Any]:
  """Every process's ``obj`` (JSON-serialisable), in process order.

  Gathered over the 1-D mesh of all devices that training uses (first the lengths, then
  the bytes padded to the longest: a collective needs the same shape everywhere), which
  also sets up that mesh's cross-process communicator while the processes are in step:
  on CPU, gloo gives a process only 30 s to join a new communicator, less than a
  compilation can take on one host and not on another (e.g. one that finds it in a
  persistent compilation cache).
  """
  mesh = parallel.create_mesh()
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  lengths = _allgather(mesh, np.array([data.size], np.int32))[:, 0]
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = _allgather(mesh, padded)
  return [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths)]


def _allgather(mesh, row: np.ndarray) -> np.ndarray:
  """``(num_processes, *row.shape)``: every process's ``row``, on every process."""
  local = np.broadcast_to(row, (jax.local_device_count(), *row.shape))  # A row a device.
  spread = parallel.global_batch(local, parallel.data_sharded(mesh))
  gathered = jax.jit(lambda x: x, out_shardings=parallel.replicated(mesh))(spread)
  rows = dict(zip((d.process_index for d in mesh.devices.flat),
                  np.asarray(gathered.addressable_data(0))))
  return np.stack([rows[p] for p in range(jax.process_count())])
