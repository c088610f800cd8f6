"""Data parallelism with ``jax.jit`` on a device mesh (pmap's modern successor).

One mesh axis, ``'data'``, spans every device of every host. The train state is
replicated; a batch is sharded along its first axis. Under ``jax.jit`` the compiler
inserts the cross-device reductions, so BatchNorm statistics and the loss are over
the *global* batch: 1 device and N devices compute the same function.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sasa_jax.errors import ConfigError

DATA_AXIS = "data"


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh over all devices of all processes (or the given ones)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


class OnMesh:
  """A jitted function traced, lowered and run with ``mesh`` as the context mesh
  (``jax.set_mesh``): kernels that cannot be partitioned automatically (Mosaic's) place
  themselves under ``jax.shard_map`` on it (``sasa_jax.ops.tpu``)."""

  def __init__(self, jitted, mesh: Mesh):
    self._jitted = jitted
    self._mesh = mesh

  def __call__(self, *args):
    with jax.set_mesh(self._mesh):
      return self._jitted(*args)

  def lower(self, *args):
    with jax.set_mesh(self._mesh):
      return self._jitted.lower(*args)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state)."""
  return NamedSharding(mesh, PartitionSpec())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) axis is split over the ``'data'`` axis."""
  return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(host_batch: dict[str, np.ndarray], sharding: NamedSharding
                 ) -> dict[str, jax.Array]:
  """Assembles each host's rows into global arrays sharded over all devices."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), host_batch)


def is_main_process() -> bool:
  """Process 0 writes summaries, the config and evaluation results."""
  return jax.process_index() == 0


def with_sharding(abstract_tree: Any, sharding: NamedSharding) -> Any:
  """``ShapeDtypeStruct`` leaves annotated with ``sharding`` (restore targets)."""
  return jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
      abstract_tree)


def check_batch_size(key: str, value: int, count: int, what: str) -> None:
  """Raises :class:`ConfigError` unless global batch ``config.<key> = value`` splits into
  ``count`` equal shares (``what``: those who share it, e.g. ``'8 devices'``)."""
  if value % count:
    lower = value - value % count
    raise ConfigError(
        f"config.{key}={value} is not divisible by the number of {what}: each takes an "
        f"equal share of the global batch. Use a multiple of {count}, e.g. "
        f"{max(lower, count)} or {lower + count}.")
