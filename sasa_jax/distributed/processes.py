"""Multi-process runs: starting ``jax.distributed`` and checking that the processes agree.

One process per host (or per group of devices) runs the same program; ``jax.distributed``
connects them to process 0's coordinator, after which ``jax.devices()`` lists the
devices of every process and the train step's collectives span all of them.

Where the processes come from: :mod:`sasa_jax.distributed.settings`.

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

import json
from typing import Any

import jax
import numpy as np
from absl import logging

from sasa_jax.config import checks, keys
from sasa_jax.distributed import mesh as mesh_lib
from sasa_jax.distributed import rendezvous
from sasa_jax.distributed.settings import ENVIRONMENT, WHAT, Settings
from sasa_jax.errors import ConfigError


def initialize(s: Settings) -> None:
  """Starts ``jax.distributed`` (before anything touches a device).

  On CPU, collectives across processes use gloo (``jax_cpu_collectives_implementation``).
  Settings that are not given are detected from the cluster; if JAX finds no cluster to
  complete them, raises :class:`ConfigError` naming the missing ones. Given settings are
  first checked to agree between the processes (:mod:`~sasa_jax.distributed.rendezvous`).
  """
  if _runs_on_cpu():
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  missing = [n for n in ENVIRONMENT if getattr(s, n) is None]
  if not missing:
    rendezvous.check_settings_agree(s)
  try:
    jax.distributed.initialize(
        s.coordinator_address, s.num_processes, s.process_id,
        heartbeat_timeout_seconds=s.process_timeout_seconds,
        shutdown_timeout_seconds=2 * s.process_timeout_seconds)
  except ValueError as e:  # JAX's "... must be defined": no cluster completed them.
    if not missing:
      raise
    listed = [f"{WHAT[n]} (--{n} or {ENVIRONMENT[n]})" for n in missing]
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
  different configs (apart from the keys of scope ``host``), listing each differing
  key's value on every process. A no-op in a single process.

  Collective: every process must call it, before anything that depends on the config
  (a process with another batch size would otherwise wait for the others forever).
  """
  if jax.process_count() == 1:
    return
  host_keys = keys.keys_in(keys.Scope.HOST)
  configs = _gather_json(checks.config_to_dict(config))
  differences = {path: values for path, values in checks.differences(*configs).items()
                 if checks.scope(path) is not keys.Scope.HOST}
  if differences:
    lines = checks.format_differences(
        differences, tuple(f"on process {p}" for p in range(len(configs))))
    raise ConfigError(
        f"The {len(configs)} processes were started with different configs:\n{lines}\n"
        f"Start every process with the same --config and overrides (only "
        f"{', '.join(sorted(host_keys))} may differ).")


def _gather_json(obj: Any) -> list[Any]:
  """Every process's ``obj`` (JSON-serialisable), in process order.

  Gathered over the 1-D mesh of all devices that training uses (first the lengths, then
  the bytes padded to the longest: a collective needs the same shape everywhere), which
  also sets up that mesh's cross-process communicator while the processes are in step:
  on CPU, gloo gives a process only 30 s to join a new communicator, less than a
  compilation can take on one host and not on another (e.g. one that finds it in a
  persistent compilation cache).
  """
  mesh = mesh_lib.create_mesh()
  data = np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)
  lengths = _allgather(mesh, np.array([data.size], np.int32))[:, 0]
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:data.size] = data
  rows = _allgather(mesh, padded)
  return [json.loads(row[:n].tobytes()) for row, n in zip(rows, lengths)]


def _allgather(mesh, row: np.ndarray) -> np.ndarray:
  """``(num_processes, *row.shape)``: every process's ``row``, on every process."""
  local = np.broadcast_to(row, (jax.local_device_count(), *row.shape))  # A row a device.
  spread = mesh_lib.global_batch(local, mesh_lib.data_sharded(mesh))
  gathered = jax.jit(lambda x: x, out_shardings=mesh_lib.replicated(mesh))(spread)
  rows = dict(zip((d.process_index for d in mesh.devices.flat),
                  np.asarray(gathered.addressable_data(0))))
  return np.stack([rows[p] for p in range(jax.process_count())])
