"""Model benchmark: training-step throughput of SASA ResNets vs convolutional ResNets.

    python -m benchmarks.models                 # ResNet-26/50 families at 64x64 and 224x224
    python -m benchmarks.models --quick         # resnet26 vs sasa_resnet26 at 64x64
    python -m benchmarks.models --models resnet50 sasa_resnet50 --sizes 224 --batch 32

One training step = ``sasa_jax.training.train_step``, the step ``train.py`` runs: forward
in train mode (batch statistics, ``batch_stats`` updated), softmax cross-entropy on random
labels, backward, and a Nesterov-momentum SGD update (optax), jitted with the state
donated. All models of one image size are compiled first (compilation excluded) and then
timed in interleaved rounds (``benchmarks.common``); the table reports the median
images/s and each SASA model's throughput as a fraction of the convolutional ResNet of
the same depth, measured in the same run. Memory is XLA's compiled memory analysis of the
step (arguments + outputs + temporaries). FLOPs are the analytic forward counts of
``sasa_jax.models.describe`` (2 x multiply-adds, the paper's Table 1 convention).
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
import time

import jax
import jax.numpy as jnp
import optax

from benchmarks import common
from sasa_jax import models, training
from sasa_jax.training import experiment

DEFAULT_MODELS = ("resnet26", "sasa_resnet26_conv_stem", "sasa_resnet26", "resnet50",
                  "sasa_resnet50_conv_stem", "sasa_resnet50")
DEFAULT_BATCH = {64: 32, 224: 8}


def prepare(name: str, size: int, batch: int, implementation: str | None = None,
            dtype: str = "float32"):
  """``(run, peak_bytes, compile_s)`` of one model's training step at ``size``: the step
  ``train.py`` runs (``training.train_step``, Nesterov SGD), on a random uint8 batch, with
  the model computing in ``dtype`` (parameters float32, as ``config.compute_dtype``)."""
  overrides = {} if implementation is None or not name.startswith("sasa") else dict(
      implementation=implementation)
  if dtype != "float32":
    overrides["dtype"] = experiment.COMPUTE_DTYPES[dtype]
  model = models.create(name, **overrides)
  config = models.get_config(name)
  key_x, key_y, key_init = jax.random.split(jax.random.key(0), 3)
  batch_data = {
      "image": jax.random.randint(key_x, (batch, size, size, config.in_channels), 0, 256,
                                  jnp.int32).astype(jnp.uint8),
      "label": jax.random.randint(key_y, (batch,), 0, config.num_classes),
  }
  variables = jax.jit(lambda x: model.init(key_init, x, train=False))(
      jnp.zeros((1, size, size, config.in_channels)))
  state = [training.TrainState.create(
      apply_fn=model.apply, params=variables["params"], batch_stats=variables["batch_stats"],
      tx=optax.sgd(0.1, momentum=0.9, nesterov=True), ema=None)]
  step = functools.partial(training.train_step, key=key_init, num_classes=config.num_classes,
                           label_smoothing=0.0, ema_decay=0.0, ema_warmup=False,
                           mean=(0.5,), std=(0.5,))
  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0,)).lower(state[0], batch_data).compile()
  compile_s = time.perf_counter() - start

  def run():
    state[0], metrics = compiled(state[0], batch_data)
    jax.block_until_ready(metrics["loss"])

  return run, common.jax_peak_bytes(compiled), compile_s


def _depth(name: str) -> str | None:
  """The ResNet depth in a model name (``sasa_resnet50_conv_stem`` -> ``'50'``), or None."""
  match = re.search(r"resnet(\d+)", name)
  return match.group(1) if match else None


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
  parser.add_argument("--dtype", choices=tuple(experiment.COMPUTE_DTYPES), default="float32",
                      help="compute dtype (parameters stay float32; default float32)")
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
      run, peak, compile_s = prepare(name, size, batch, args.implementation, args.dtype)
      runs[name] = run
      flops = models.describe(name, image_size=size)["flops"]
      info[name] = (peak, compile_s, flops)
      print(f"  {name} at {size}x{size}, batch {batch}: compiled in {compile_s:.0f} s",
            flush=True)
    times = common.time_interleaved(runs, repeats=args.repeats, min_sample_s=0.2,
                                    slow_budget_s=30)
    conv = {_depth(n): batch / t for n, t in times.items()
            if not n.startswith("sasa") and _depth(n)}
    for name, t in times.items():
      ips = batch / t
      base = conv.get(_depth(name))
      peak, compile_s, flops = info[name]
      rows.append([f"{size}×{size}", batch, args.dtype, name, f"{ips:.3g}",
                   common.fmt_ratio(ips / base) if base else "—",
                   f"{flops / 1e9:.3g}", f"{3 * flops * ips / 1e9:.3g}", common.fmt_mib(peak),
                   f"{compile_s:.0f}"])
      print(f"  {name}: {ips:.3g} images/s", flush=True)
  print()
  print(common.markdown_table(
      ["image", "batch", "dtype", "model", "images/s", "÷ ResNet same depth", "fwd GFLOPs/image",
       "≈ train GFLOP/s (3× fwd)", "peak MiB", "compile s"], rows,
      align=["l", "r", "l", "l"] + ["r"] * 6))
  print(f"\nTotal wall time {time.time() - started:.0f} s.")
  return 0


if __name__ == "__main__":
  sys.exit(main())
