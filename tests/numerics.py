"""Comparisons shared by the tests of the ops and the layers against plain references."""

import jax.numpy as jnp

from benchmarks.accuracy import rel_error  # noqa: F401  # pylint: disable=unused-import

# Bounds on rel_error against a float32 reference; bf16 runs are compared with the
# reference on the same bf16-rounded inputs.
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}
