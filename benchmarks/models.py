"""Model benchmark: training-step throughput of SASA ResNets vs convolutional ResNets.

    python -m benchmarks.models                 # ResNet-26/50 families at 64x64 and 224x224
    python -m benchmarks.models --quick         # resnet26 vs sasa_resnet26 at 64x64
    python -m benchmarks.models --models resnet50 sasa_resnet50 --sizes 224 --batch 32

One training step = forward in train mode (batch statistics, ``batch_stats`` updated),
softmax cross-entropy on random labels, backward, and a Nesterov-momentum SGD update
(optax), jitted with the state donated. All models of one image size are compiled first
(compilation excluded) and then timed in interleaved rounds (``benchmarks.common``); the
table reports the median images/s and each SASA model's throughput as a fraction of the
convolutional ResNet of the same depth, measured in the same run. Memory is XLA's compiled
memory analysis of the step (arguments + outputs + temporaries). FLOPs are the analytic
forward counts of ``sasa_jax.models.describe`` (2 x multiply-adds, the paper's Table 1
convention).
"""

from __future__ import annotations

import argparse
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from sasa_jax import models

DEFAULT_MODELS = ("resnet26", "sasa_resnet26_conv_stem", "sasa_resnet26", "resnet50",
                  "sasa_resnet50_conv_stem", "sasa_resnet50")
DEFAULT_BATCH = {64: 32, 224: 8}


def make_train_step(model, tx):
  """A jitted SGD step ``(params, batch_stats, opt_state, x, y) -> (..., loss)``."""

  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(p):
      logits, new_state = model.apply({"params": p, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new_state["batch_stats"]

    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1, 2))


def prepare(name: str, size: int, batch: int, implementation: str | None = None):
  """``(run, peak_bytes, compile_s)`` of one model's training step at ``size``."""
  overrides = {} if implementation is None or not name.startswith("sasa") else dict(
      implementation=implementation)
  model = models.create(name, **overrides)
  in_channels = models.get_config(name).in_channels
  num_classes = models.get_config(name).num_classes
  key_x, key_y, key_init = jax.random.split(jax.random.key(0), 3)
  images = jax.random.normal(key_x, (batch, size, size, in_channels))
  labels = jax.random.randint(key_y, (batch,), 0, num_classes)
  variables = jax.jit(lambda x: model.init(key_init, x, train=False))(images)
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  state = [variables["params"], variables["batch_stats"], None]
  state[2] = tx.init(state[0])
  start = time.perf_counter()
  compiled = make_train_step(model, tx).lower(*state, images, labels).compile()
  compile_s = time.perf_counter() - start

  def run():
    params, stats, opt_state, loss = compiled(*state, images, labels)
    state[:] = [params, stats, opt_state]
    jax.block_until_ready(loss)

  return run, common.jax_peak_bytes(compiled), compile_s


def _depth(name: str) -> str:
  return re.search(r"resnet(\d+)", name).group(1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true",
                      help="resnet26 vs sasa_resnet26 at 64x64 only")
  parser.add_argument("--models", nargs="+", default=None,
                      help=f"registered model names (default: {' '.join(DEFAULT_MODELS)})")
  parser.add_argument("--sizes", nargs="+", type=int, default=None,
                      help="square image sizes (default: 64 224)")
  parser.add_argument("--batch", type=int, default=None,
                      help="batch size (default: 32 at 64x64, 8 at 224x224)")
  parser.add_argument("--repeats", type=int, default=5, help="timing rounds")
  parser.add_argument("--implementation", default=None,
                      help="force the SASA layers' implementation (default: automatic)")
  args = parser.parse_args(argv)
  names = args.models or (["resnet26", "sasa_resnet26"] if args.quick else DEFAULT_MODELS)
  sizes = args.sizes or ([64] if args.quick else [64, 224])

  print(f"Machine: {common.machine()}")
  print(f"Command: python -m benchmarks.models {' '.join(sys.argv[1:] if argv is None else argv)}")
  started = time.time()
  rows = []
  for size in sizes:
    batch = args.batch or DEFAULT_BATCH.get(size, 8)
    runs, info = {}, {}
    for name in names:
      run, peak, compile_s = prepare(name, size, batch, args.implementation)
      runs[name] = run
      flops = models.describe(name, image_size=size)["flops"]
      info[name] = (peak, compile_s, flops)
      print(f"  {name} at {size}x{size}, batch {batch}: compiled in {compile_s:.0f} s",
            flush=True)
    times = common.time_interleaved(runs, repeats=args.repeats, min_sample_s=0.2,
                                    slow_budget_s=30)
    conv = {_depth(n): batch / t for n, t in times.items() if not n.startswith("sasa")}
    for name, t in times.items():
      ips = batch / t
      base = conv.get(_depth(name))
      peak, compile_s, flops = info[name]
      rows.append([f"{size}×{size}", batch, name, f"{ips:.3g}",
                   common.fmt_ratio(ips / base) if base else "—",
                   f"{flops / 1e9:.3g}", f"{3 * flops * ips / 1e9:.3g}", common.fmt_mib(peak),
                   f"{compile_s:.0f}"])
      print(f"  {name}: {ips:.3g} images/s", flush=True)
  print()
  print(common.markdown_table(
      ["image", "batch", "model", "images/s", "÷ ResNet same depth", "fwd GFLOPs/image",
       "≈ train GFLOP/s (3× fwd)", "peak MiB", "compile s"], rows,
      align=["l", "r", "l"] + ["r"] * 6))
  print(f"\nTotal wall time {time.time() - started:.0f} s.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
