"""Comparisons shared by the tests of the ops and the layers against plain references."""

import jax.numpy as jnp
import numpy as np

# Bounds on rel_error against a float32 reference; bf16 runs are compared with the
# reference on the same bf16-rounded inputs.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def rel_error(got, want) -> float:
  """``||got - want|| / ||want||`` in float64 (absolute where ``want`` is exactly zero,
  e.g. d out / d q for a 1x1 window)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
