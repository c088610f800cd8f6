"""Checkpoint benchmark: what the integrity checksums add to saving a train state.

    python -m benchmarks.checkpoint                      # sasa_resnet50's ImageNet train state
    python -m benchmarks.checkpoint --model sasa_tiny    # the digits model (seconds)

The state is the one ``train.py --config=configs/imagenet.py:<model>`` checkpoints:
``training.create_train_state`` with that config's optimizer (Nesterov SGD: one momentum
buffer per parameter) and EMA of the weights (``ema_decay`` 0.9999), replicated on this
machine's devices (``configs/default.py``'s for a model that is not an ImageNet one).
Measured, in interleaved rounds (the order rotated every round; medians reported):

* ``checksums``: ``checksums.leaf_checksums(state)``, the jitted pass over every array
  plus fetching the scalars: what a save adds, and what a restore adds to verify;
  compiled before timing (the compile time, once per process, is reported apart).
* ``save``: ``Checkpointer.save`` then ``wait_until_finished`` with
  ``async_checkpointing=False``, Orbax writing everything to ``--dir`` (default: a
  temporary directory), with the checksums and without them (``_named_checksums``
  replaced by an empty dict, all else the same).
* ``async``: the blocking part of an asynchronous ``Checkpointer.save`` (the time the
  training loop waits: the copy to the host, and the checksums), with and without.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from unittest import mock

import jax
import optax

from benchmarks import common
from configs import default, imagenet
from sasa_jax import training
from sasa_jax.distributed import mesh
from sasa_jax.training import optimizers
from sasa_jax.workdir import checkpointer, checksums


def train_state(model: str):
  """``(config, state)``: the train state of ``model`` as its config trains it."""
  if model in imagenet.MODELS:
    config, num_classes, channels = imagenet.get_config(model), 1000, 3
  else:
    config, num_classes, channels = default.get_config(), 10, 1
    config.model = model
  net = training.create_model(config, num_classes)
  tx = optimizers.create_optimizer(config, optax.constant_schedule(0.1))
  init = jax.jit(lambda key: training.create_train_state(
      key, config, net, (config.image_size, config.image_size, channels), tx),
                 out_shardings=mesh.replicated(mesh.create_mesh()))
  return config, jax.block_until_ready(init(jax.random.key(0)))


def _no_checksums(tree):
  del tree
  return {}


def time_saves(config, state, directory: str, repeats: int) -> dict[str, float]:
  """Median seconds of a synchronous save and of an asynchronous save's blocking part,
  with and without the checksums (keys ``'save'``, ``'save_plain'``, ``'async'``,
  ``'async_plain'``), in interleaved rounds after one warm-up round."""
  variants = {"save": (False, True), "save_plain": (False, False),
              "async": (True, True), "async_plain": (True, False)}
  samples = {name: [] for name in variants}
  with contextlib.ExitStack() as stack:
    writers = {name: stack.enter_context(checkpointer.Checkpointer(
        f"{directory}/{name}", max_to_keep=1, async_checkpointing=is_async))
        for name, (is_async, _) in variants.items()}
    names = list(variants)
    for r in range(repeats + 1):
      for name in names[r % len(names):] + names[:r % len(names)]:
        is_async, with_checksums = variants[name]
        patch = (contextlib.nullcontext() if with_checksums else
                 mock.patch.object(checkpointer, "_named_checksums", _no_checksums))
        with patch:
          start = time.perf_counter()
          writers[name].save(r + 1, state, training.data_position(r + 1, config), config)
          if not is_async:
            writers[name].wait_until_finished()
          seconds = time.perf_counter() - start
          writers[name].wait_until_finished()
        if r > 0:  # Round 0 warms up (compilation of the checksums, file system).
          samples[name].append(seconds)
  return {name: statistics.median(s) for name, s in samples.items()}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", default="sasa_resnet50",
                      help="a model of configs/imagenet.py, or another registered "
                           "model (with configs/default.py)")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds")
  parser.add_argument("--dir", default=None,
                      help="where to write the checkpoints (default: a temporary "
                           "directory)")
  args = parser.parse_args(argv)

  config, state = train_state(args.model)
  leaves = jax.tree.leaves(state)
  nbytes = sum(x.nbytes for x in leaves)
  start = time.perf_counter()
  checksums.leaf_checksums(state)  # Compiles.
  first_call = time.perf_counter() - start
  timed = common.time_interleaved({"checksums": lambda: checksums.leaf_checksums(state)},
                                  repeats=args.repeats)
  with (contextlib.nullcontext(args.dir) if args.dir
        else tempfile.TemporaryDirectory(prefix="sasa_ckpt_bench_")) as directory:
    saves = time_saves(config, state, directory, args.repeats)

  print(f"Machine: {common.machine()}")
  print(f"{args.model}: {len(leaves)} arrays, {common.fmt_mib(nbytes)} MiB (params, "
        f"BatchNorm statistics, optimizer state{', EMA' if config.ema_decay else ''}); "
        f"checksums compiled in {first_call - timed['checksums']:.2f} s (once per "
        f"process). Medians of {args.repeats} rounds, ms:\n")
  rows = [["checksums alone", "—", common.fmt_ms(timed["checksums"]), "—"]]
  for name, title in (("save", "save (synchronous, to disk)"),
                      ("async", "async save, blocking part")):
    plain, with_sums = saves[f"{name}_plain"], saves[name]
    rows.append([title, common.fmt_ms(plain), common.fmt_ms(with_sums),
                 f"{with_sums / plain:.2f}×"])
  print(common.markdown_table(["", "without checksums", "with checksums", "ratio"], rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
