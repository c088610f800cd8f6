"""Benchmarks of sasa_jax (never run as tests): ``python -m benchmarks.layers``,
``python -m benchmarks.models`` and the accuracy check ``python -m benchmarks.accuracy``.
See ``benchmarks/README.md`` for the results."""

import os

# PyTorch's OpenMP threads busy-wait at barriers by default; on a shared machine (or beside
# XLA's own thread pool in the same process) a descheduled spinning thread made small torch
# layers up to ~30x slower (604 ms instead of 21 ms for a 14x14 layer). Passive waiting
# does not slow the large layers. Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
