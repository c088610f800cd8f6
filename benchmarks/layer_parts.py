"""Where the SASA layer's forward + backward time goes, part by part, interleaved.

    python -m benchmarks.layer_parts [--batch 8] [--heads 8]

At the layer benchmark's target shape (32×32, 64 → 64 channels, k = 7): the whole layer
with and without relative logits, the default op with and without them, ``blocked`` with
them (for scale), the q/k/v projections alone, and a 3×3 conv, each as the gradients of
its inputs (and parameters) for a fixed random cotangent.
"""

from __future__ import annotations

import argparse
import functools
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks.layers import CONV, TARGET
from sasa_jax import ops
from sasa_jax.layers import LocalSelfAttention


def bench_parts(batch, size, channels, heads, kernel, *, repeats) -> dict[str, float]:
  """``{part: seconds}`` of forward + backward, timed interleaved."""
  default = common.default_implementation(size, kernel, channels, heads)
  (q, k, v, rel_h, rel_w), g = common.op_inputs(batch, size, channels, heads, kernel)

  def op(implementation, relative):
    attend = functools.partial(ops.local_attention, kernel_size=kernel,
                               implementation=implementation)
    if relative:
      return (lambda q, k, v, rh, rw: attend(q, k, v, rel_h=rh, rel_w=rw),
              (q, k, v, rel_h, rel_w), g)
    return attend, (q, k, v), g

  parts = {
      f"op {default}, relative logits": op(default, True),
      f"op {default}, no positional term": op(default, False),
      "op blocked, relative logits": op("blocked", True),
  }
  keys = jax.random.split(jax.random.key(1), 2)
  x = jax.random.normal(keys[0], (batch, size, size, channels))
  gx = jax.random.normal(keys[1], (batch, size, size, channels))
  modules = {
      f"layer, default ({default}, relative)": (LocalSelfAttention(channels, heads, kernel), gx),
      "layer, positional='none'": (
          LocalSelfAttention(channels, heads, kernel, positional="none"), gx),
      CONV: (nn.Conv(channels, (3, 3), use_bias=False), gx),
      "q/k/v projections alone (one 1×1 DenseGeneral to 3C)": (
          nn.DenseGeneral((3, channels), use_bias=False),
          jnp.ones((batch, size, size, 3, channels))),
  }
  for name, (module, cotangent) in modules.items():
    parts[name] = (module.apply, (module.init(jax.random.key(0), x), x), cotangent)
  runs = {name: common.compiled_vjp(fn, args, cotangent)[0]
          for name, (fn, args, cotangent) in parts.items()}
  return common.time_interleaved(runs, repeats=repeats)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=TARGET["batch"])
  parser.add_argument("--heads", type=int, default=TARGET["heads"])
  parser.add_argument("--repeats", type=int, default=11, help="timing rounds")
  args = parser.parse_args(argv)
  size, channels, kernel = TARGET["size"], TARGET["channels"], TARGET["kernel"]
  print(f"Machine: {common.machine()}")
  times = bench_parts(args.batch, size, channels, args.heads, kernel, repeats=args.repeats)
  print(f"\nfwd+bwd, batch {args.batch}, {size}×{size}, C={channels}, k={kernel}, "
        f"{args.heads} heads:\n")
  print(common.markdown_table(["part", "ms", "÷ conv 3×3"], [
      [n, common.fmt_ms(t), f"{t / times[CONV]:.1f}"] for n, t in times.items()]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
