"""Accuracy on this backend: every local-attention implementation against ``reference``,
and the attention stem's kernels against its XLA formulation.

    python -m benchmarks.accuracy                       # all implementations, f32 and bf16
    python -m benchmarks.accuracy --precision highest   # float32 matmuls at full precision
    python -m benchmarks.accuracy --implementations fused shifted

The tests check the same property on CPU; this is the check to run on a GPU or TPU, where
the implementations compile to other kernels (``fused`` runs as Triton there and ``tpu``
as Mosaic's kernels, not in Pallas's interpret mode) and float32 matmuls default to lower
precision (TF32 on NVIDIA GPUs, bfloat16 passes on TPUs). For each shape and dtype, the op's output and its
gradients with respect to q, k, v, ``rel_h`` and ``rel_w`` (for a fixed random output
cotangent) are compared with ``reference`` computed in float32 at
``jax.default_matmul_precision('highest')`` on the same inputs (bf16 inputs are upcast).
Each cell is the largest ``||got - want|| / ||want||`` over the shapes; the exit status is
1 if any is NaN or above ``--fail-above``.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from sasa_jax import ops
from sasa_jax.ops import stem

# (B, H, W, N, d, kernel_size): odd and non-square images and windows, a window larger
# than the image, and a model-like 28x28 d = 8 map.
SHAPES = (
    (2, 13, 11, 3, 8, 5),
    (1, 9, 22, 2, 16, (3, 7)),
    (2, 7, 6, 2, 6, 7),
    (1, 28, 28, 8, 8, 7),
)
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
QUANTITIES = ("output", "d query", "d key", "d value", "d rel_h", "d rel_w")


def _inputs(shape, dtype, seed=0):
  """``(q, k, v, rel_h, rel_w)`` and an output cotangent, random normal, in ``dtype``."""
  batch, height, width, heads, depth, kernel_size = shape
  kh, kw = ops.window_shape(kernel_size)
  keys = jax.random.split(jax.random.key(seed), 6)
  qkv = [jax.random.normal(key, (batch, height, width, heads, depth)) for key in keys[:3]]
  tables = [jax.random.normal(keys[3], (kh, depth // 2)),
            jax.random.normal(keys[4], (kw, depth // 2))]
  cotangent = jax.random.normal(keys[5], (batch, height, width, heads, depth))
  return [x.astype(dtype) for x in qkv + tables], cotangent.astype(dtype)


def output_and_grads(implementation: str, kernel_size, args, cotangent):
  """The op's output and its gradients w.r.t. ``args = (q, k, v, rel_h, rel_w)``."""

  def op(q, k, v, rel_h, rel_w):
    return ops.local_attention(q, k, v, kernel_size=kernel_size, rel_h=rel_h, rel_w=rel_w,
                               implementation=implementation)

  @jax.jit
  def run(args, cotangent):
    out, vjp = jax.vjp(op, *args)
    return (out,) + vjp(cotangent)

  return run(args, cotangent)


def rel_error(got, want) -> float:
  """``||got - want|| / ||want||`` in float64 (absolute where ``want`` is exactly zero,
  e.g. d out / d q for a 1x1 window)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


def errors(implementations, dtypes, precision: str, shapes=SHAPES) -> dict:
  """``{(implementation, dtype): [max relative error of each of QUANTITIES]}``."""
  table = {}
  for dtype_name in dtypes:
    dtype = DTYPES[dtype_name]
    for shape in shapes:
      args, cotangent = _inputs(shape, dtype)
      upcast = [x.astype(jnp.float32) for x in args]
      with jax.default_matmul_precision("highest"):
        want = output_and_grads("reference", shape[-1], upcast,
                                cotangent.astype(jnp.float32))
      with jax.default_matmul_precision(precision):
        for name in implementations:
          got = output_and_grads(name, shape[-1], args, cotangent)
          cell = table.setdefault((name, dtype_name), [0.0] * len(QUANTITIES))
          for i, (g, w) in enumerate(zip(got, want)):
            error = rel_error(g, w)
            cell[i] = error if np.isnan(error) else max(cell[i], error)
  return table


# The attention stem's block statistics (``sasa_jax.ops.stem``): an RGB batch in 4x4
# blocks, 4 heads, 4 mixtures, 64 channels, as in the ImageNet models.
STEM_SHAPE = (2, 16, 12, 3)
STEM_QUANTITIES = ("maximum", "minimum", "mean", "mean square", "d input", "d form",
                   "d mixture", "d values")


def stem_errors(dtypes, precision: str) -> dict:
  """``{dtype: [max relative error of each of STEM_QUANTITIES]}``: the stem's statistics
  and the gradients of a random linear function of them as this backend computes them
  (the Mosaic kernels on TPU, elsewhere the kernels interpreted) against the XLA
  formulation in float32 at 'highest' (its output rounded to the dtype, as the kernels
  round theirs)."""
  keys = jax.random.split(jax.random.key(1), 8)
  x = jax.random.normal(keys[0], STEM_SHAPE)
  params = [jax.random.normal(keys[1], (3, 4, 3)),
            jax.nn.softmax(jax.random.normal(keys[2], (16, 4))),
            jax.random.normal(keys[3], (4 * 4 * 3, 64))]
  interpret = None if jax.default_backend() == "tpu" else True

  def statistics_and_grads(compute, x, *params):
    stats, vjp = jax.vjp(compute, x, *params)
    cotangents = [jax.random.normal(key, s.shape, s.dtype) for key, s in zip(keys[4:], stats)]
    return (*stats, *vjp(type(stats)(*cotangents)))

  table = {}
  for dtype_name in dtypes:
    dtype = DTYPES[dtype_name]
    rounded = [a.astype(dtype).astype(jnp.float32) for a in (x, *params)]
    with jax.default_matmul_precision("highest"):
      want = jax.jit(functools.partial(statistics_and_grads, lambda *a: stem.statistics_of(
          stem.block_attention(*a, block=4)[0].astype(dtype), 4)))(*rounded)
    with jax.default_matmul_precision(precision):
      got = jax.jit(functools.partial(statistics_and_grads, functools.partial(
          stem.block_statistics, block=4, interpret=interpret)))(
              rounded[0].astype(dtype), *rounded[1:])
    table[dtype_name] = [rel_error(g, w) for g, w in zip(got, want)]
  return table


def _runs_here(implementation: str) -> bool:
  """Whether ``implementation`` runs on this backend (``fused`` does not on TPU, nor
  ``tpu`` on GPU)."""
  try:
    ops.check_platform(implementation, jax.default_backend())
  except ValueError:
    return False
  return True


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--implementations", nargs="+", choices=list(ops.IMPLEMENTATIONS),
                      help="default: every one that runs on this backend")
  parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
  parser.add_argument("--precision", default="default",
                      choices=("default", "high", "highest"),
                      help="jax.default_matmul_precision for the implementations "
                      "(the reference always runs at 'highest')")
  parser.add_argument("--fail-above", type=float, default=5e-2,
                      help="exit 1 if any relative error exceeds this (default 5e-2)")
  args = parser.parse_args(argv)

  print(f"Machine: {common.machine()}")
  print(f"Backend: {jax.default_backend()} ({jax.devices()[0].device_kind})")
  print(f"Command: python -m benchmarks.accuracy "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}")
  print(f"Shapes (B, H, W, N, d, k): {', '.join(map(str, SHAPES))}\n")
  implementations = args.implementations or [
      name for name in ops.IMPLEMENTATIONS if _runs_here(name)]
  table = errors(implementations, args.dtypes, args.precision)
  print(common.markdown_table(
      ["implementation", "dtype"] + [f"{q} ‖Δ‖/‖ref‖" for q in QUANTITIES],
      [[name, dtype] + [f"{e:.1e}" for e in cell] for (name, dtype), cell in table.items()]))
  stems = stem_errors(args.dtypes, args.precision)
  kernels = "Mosaic" if jax.default_backend() == "tpu" else "interpreted"
  print(f"\nThe attention stem's block statistics (TPU kernels, {kernels}) against its XLA "
        f"formulation, (B, H, W, C) = {STEM_SHAPE}, 4x4 blocks:\n")
  print(common.markdown_table(
      ["dtype"] + [f"{q} ‖Δ‖/‖ref‖" for q in STEM_QUANTITIES],
      [[dtype] + [f"{e:.1e}" for e in cell] for dtype, cell in stems.items()]))
  worst = max((e for cell in (*table.values(), *stems.values()) for e in cell),
              key=lambda e: (np.isnan(e), e))
  failed = bool(np.isnan(worst) or worst > args.fail_above)
  print(f"\nLargest relative error: {worst:.1e} ({'above' if failed else 'within'} "
        f"--fail-above {args.fail_above:g}).")
  return int(failed)


if __name__ == "__main__":
  sys.exit(main())
