"""Input-pipeline benchmark: images/s of each process with 1 and with 2 (or more) processes.

    python -m benchmarks.input_pipeline        # Fashion-MNIST from ../shared/data/tfds, else digits
    python -m benchmarks.input_pipeline --dataset digits --processes 1 2 4 --batch 128

Each process runs what each process of a multi-host ``train.py`` run reads:
``sasa_jax.data.train_iterator`` with its ``process_index`` of ``process_count``, i.e.
rows ``[p·B/P, (p+1)·B/P)`` of every global batch of ``B`` images (the split shuffled per
epoch, the config's augmentation per example, uint8 host batches). For each process count
``P``, ``P`` operating-system processes (as on ``P`` hosts) build their iterators, take a
warm-up batch, start together and time ``--batches`` batches; the rounds of the process
counts are interleaved (``--repeats``) and each process reports the median of its
rounds. A process reads ``B/P`` rows a batch, so on hosts with their own cores the run's
images/s grows with ``P``; on one machine, the processes share its cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

SHARED_TFDS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           os.pardir, "shared", "data", "tfds")


def data_overrides(dataset: str | None, data_dir: str | None) -> dict[str, Any]:
  """The config keys of the benchmark's data: ``--dataset`` (default: Fashion-MNIST from
  ``../shared/data/tfds`` when present, else the embedded digits)."""
  if dataset is None:
    shared = os.path.isdir(os.path.join(SHARED_TFDS, "fashion_mnist"))
    dataset = "fashion_mnist" if shared else "digits"
    data_dir = data_dir or (os.path.normpath(SHARED_TFDS) if shared else None)
  if dataset == "digits":
    return {"dataset": "digits", "image_size": 8}
  return {"dataset": dataset, "data_dir": data_dir, "image_size": 28,
          "data_download": False}


def _config(overrides: dict[str, Any]):
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.update(overrides)
  return config


def _measure(overrides: dict[str, Any], process_index: int, process_count: int,
             num_batches: int, start: Any) -> float:
  """One process: seconds for ``num_batches`` of its rows, after a warm-up batch."""
  from sasa_jax import data, training  # pylint: disable=g-import-not-at-top

  config = _config(overrides)
  with tempfile.TemporaryDirectory() as workdir:  # Nothing is written there.
    experiment = training.Experiment(config, workdir)
  batches = data.train_iterator(
      experiment.dataset.source(config.train_split), config, process_index=process_index,
      process_count=process_count, info=experiment.info)
  try:
    rows = len(next(batches)["label"])
    if rows != config.batch_size // process_count:
      raise AssertionError(f"process {process_index} of {process_count} read {rows} rows "
                           f"of a batch of {config.batch_size}")
    start.wait()
    begin = time.perf_counter()
    for _ in range(num_batches):
      next(batches)
    return time.perf_counter() - begin
  finally:
    data.close(batches)


def _round(overrides: dict[str, Any], process_count: int, num_batches: int) -> list[float]:
  """Seconds of each of ``process_count`` processes started together."""
  context = multiprocessing.get_context("spawn")
  with context.Manager() as manager, context.Pool(process_count) as pool:
    start = manager.Barrier(process_count)
    return pool.starmap(_measure, [(overrides, p, process_count, num_batches, start)
                                   for p in range(process_count)])


def measure(overrides: dict[str, Any], process_counts: list[int], num_batches: int,
            repeats: int) -> dict[int, list[float]]:
  """``{P: [median images/s of process p for p < P]}``, the process counts' rounds
  interleaved (the order rotated every round)."""
  seconds: dict[int, list[list[float]]] = {p: [] for p in process_counts}
  for r in range(repeats):
    order = process_counts[r % len(process_counts):] + process_counts[:r % len(process_counts)]
    for p in order:
      seconds[p].append(_round(overrides, p, num_batches))
  rate = {p: overrides["batch_size"] // p * num_batches for p in process_counts}
  return {p: [rate[p] / statistics.median(s[i] for s in rounds) for i in range(p)]
          for p, rounds in seconds.items()}


def table(results: dict[int, list[float]], batch_size: int) -> str:
  base = sum(results[min(results)])
  rows = [[p, batch_size // p, " / ".join(f"{x:,.0f}" for x in per_process),
           f"{sum(per_process):,.0f}", common.fmt_ratio(sum(per_process) / base)]
          for p, per_process in sorted(results.items())]
  return common.markdown_table(
      ["processes", "rows a batch, each", "images/s of each process", "images/s, all",
       f"÷ {min(results)} process(es)"], rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dataset", default=None, help="default: fashion_mnist from "
                      "../shared/data/tfds if present, else digits")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--batch", type=int, default=256, help="global batch size")
  parser.add_argument("--batches", type=int, default=50, help="timed batches a round")
  parser.add_argument("--repeats", type=int, default=3, help="rounds per process count")
  parser.add_argument("--augmentation", default="cifar",
                      help="config.augmentation (default: pad-4 crop + flip)")
  parser.add_argument("--data_threads", type=int, default=1)
  args = parser.parse_args(argv)
  for p in args.processes:
    if p < 1 or args.batch % p:
      parser.error(f"--processes {p}: needs a positive count that divides --batch "
                   f"{args.batch}")

  overrides = {**data_overrides(args.dataset, args.data_dir), "batch_size": args.batch,
               "augmentation": args.augmentation, "data_threads": args.data_threads}
  print(f"Machine: {common.machine()}")
  print(f"Command: python -m benchmarks.input_pipeline "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}")
  print(f"Data: {overrides['dataset']} (data_dir={overrides.get('data_dir')}), "
        f"augmentation {args.augmentation!r}, global batch {args.batch}, "
        f"{args.batches} batches a round, {args.repeats} round(s), "
        f"{args.data_threads} reader thread(s) a process\n")
  results = measure(overrides, sorted(set(args.processes)), args.batches, args.repeats)
  print(table(results, args.batch))
  return 0


if __name__ == "__main__":
  sys.exit(main())
