"""A branch per platform, traced only for the platform the program is for where the
trace can tell.

``jax.lax.platform_dependent`` traces a branch for every platform and keeps the one for
the platform the program is lowered for: right wherever it is lowered (a program compiled
for TPU from a CPU host runs the TPU branch), at the cost of tracing every branch (the
TPU kernels' on a CPU or GPU host). Where a mesh is set (``jax.set_mesh``, as the
training loop and ``benchmarks.tpu`` trace their steps), its devices say the platform,
and only that branch is traced.
"""

from __future__ import annotations

import jax

# ``platform_dependent``'s platform names (and a device's ``platform``) -> the backend.
BACKENDS = {"cpu": "cpu", "cuda": "gpu", "rocm": "gpu", "tpu": "tpu"}
_DEVICE_BACKENDS = {**BACKENDS, "gpu": "gpu"}


def mesh_backend() -> str | None:
  """``'cpu'``, ``'gpu'`` or ``'tpu'``: the platform of the devices of the mesh set with
  ``jax.set_mesh``; None without one (or an abstract mesh without devices)."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return None if device is None else _DEVICE_BACKENDS.get(device.platform)


def platform_dependent(*operands, default, **branches):
  """``jax.lax.platform_dependent(*operands, default=default, **branches)``, branches
  keyed by the platform names of ``BACKENDS``; under a mesh (``mesh_backend``), only the
  branch for its platform (or ``default``) is traced and called."""
  backend = mesh_backend()
  if backend is None:
    return jax.lax.platform_dependent(*operands, default=default, **branches)
  chosen = [branch for platform, branch in branches.items() if BACKENDS[platform] == backend]
  return (chosen[0] if chosen else default)(*operands)
