"""The ablation sweep's report: ``report.md``, a bar chart and learning curves per ablation.

Reads each run's ``result.json`` (final test metrics, parameters, FLOPs, wall time; written
by ``experiments.ablations``) and its TensorBoard logs (``tensorboard``'s
``EventAccumulator``): ``train/images_per_second`` (the median over the logged intervals,
compilation and evaluation excluded), ``train/loss`` and ``eval/accuracy`` for the curves.
Accuracies are means ± sample standard deviations over seeds.
"""

from __future__ import annotations

import datetime
import os
import statistics
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from benchmarks import common
from sasa_jax.models.flops import human

REPORT_FILE = "report.md"


def read_scalars(run_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{tag: (steps, values)}`` of a run's TensorBoard scalars, in step order.

  A resumed run's logs hold several sessions; the reader drops the events that a later
  session wrote again (steps logged after the last checkpoint of a killed session).
  The logs are read by TensorBoard's own record reader: with TensorFlow installed (the
  ``[data]`` extra) TensorBoard would import it (about 5 s) only to read the files.
  """
  # TensorBoard's switch to its stub of the TensorFlow API (//tensorboard/compat:
  # no_tensorflow): the presence of this module. Read when TensorBoard first needs TF.
  sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top

  accumulator = event_accumulator.EventAccumulator(
      os.path.join(run_dir, "tensorboard"), size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  scalars = {}
  for tag in accumulator.Tags()["scalars"]:
    by_step = {event.step: event.value for event in accumulator.Scalars(tag)}
    steps = np.array(sorted(by_step))
    scalars[tag] = (steps, np.array([by_step[s] for s in steps]))
  return scalars


def _mean_std(values: Sequence[float]) -> str:
  mean = 100 * statistics.mean(values)
  if len(values) < 2:
    return f"{mean:.2f}"
  return f"{mean:.2f} ± {100 * statistics.stdev(values):.2f}"


def _variant_rows(ablation, groups, results, scalars):
  """One dict per variant with finished runs: label, paper, run names, accuracies over
  seeds, params, FLOPs, images/s."""
  rows = []
  for variant in ablation.variants:
    names = [n for n in groups[variant.label] if results.get(n)]
    if not names:
      continue
    first = results[names[0]]
    rates = [float(np.median(scalars[n]["train/images_per_second"][1])) for n in names
             if "train/images_per_second" in scalars[n]]
    rows.append(dict(
        label=variant.label, paper=variant.paper, names=names, series=variant.series,
        x=variant.x,
        accuracies=[results[n]["eval"]["accuracy"] for n in names],
        params=first["params"], flops=first["flops"],
        images_per_second=statistics.median(rates) if rates else float("nan")))
  return rows


def _table(rows) -> list[str]:
  header = ("| variant | test accuracy % (mean ± std) | seeds | params | FLOPs | "
            "train images/s | paper top-1 % (ImageNet) |")
  lines = [header, "|" + "---|" * 7]
  for row in rows:
    cells = [row["label"], _mean_std(row["accuracies"]), str(len(row["accuracies"])),
             human(row["params"]), human(row["flops"]), f"{row['images_per_second']:.0f}",
             "" if row["paper"] is None else f"{row['paper']}"]
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _bar_chart(path: str, ablation, rows) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(rows), 3.6))
  x = np.arange(len(rows))
  means = [100 * np.mean(r["accuracies"]) for r in rows]
  stds = [100 * np.std(r["accuracies"], ddof=1) if len(r["accuracies"]) > 1 else 0.0
          for r in rows]
  ax.bar(x, means, yerr=stds, capsize=6, color="#9ecae1", edgecolor="#3182bd")
  for i, row in enumerate(rows):
    ax.plot([i] * len(row["accuracies"]), 100 * np.array(row["accuracies"]), "k.", ms=5)
  low = min(100 * min(r["accuracies"]) for r in rows)
  high = max(100 * max(r["accuracies"]) for r in rows)
  margin = max(0.5, 0.3 * (high - low))
  ax.set_ylim(max(0.0, low - margin), min(100.0, high + margin))
  ax.set_xticks(x, [r["label"] for r in rows], rotation=15, ha="right")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(ablation.title, fontsize=10)
  ax.grid(axis="y", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _series(rows) -> dict[str, list[dict]]:
  """``{series: its rows in the order of x}`` of an ablation along an axis."""
  series = {}
  for row in rows:
    series.setdefault(row["series"], []).append(row)
  return {name: sorted(rs, key=lambda r: r["x"]) for name, rs in series.items()}


def _accuracy_plot(path: str, ablation, rows) -> None:
  """Test accuracy against the axis (the width), one line per series, with error bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(5.6, 3.8))
  for name, rs in _series(rows).items():
    xs = [r["x"] for r in rs]
    means = [100 * np.mean(r["accuracies"]) for r in rs]
    stds = [100 * np.std(r["accuracies"], ddof=1) if len(r["accuracies"]) > 1 else 0.0
            for r in rs]
    ax.errorbar(xs, means, yerr=stds, marker="o", capsize=5, label=name)
    for x, r in zip(xs, rs):
      ax.plot([x] * len(r["accuracies"]), 100 * np.array(r["accuracies"]), "k.", ms=3)
  ax.set_xscale("log", base=2)
  ax.set_xticks(sorted({r["x"] for r in rows}), [f"{r:g}" for r in sorted({r["x"] for r in rows})])
  ax.set(xlabel="width C (first stage)", ylabel="test accuracy (%)")
  ax.set_title(ablation.title, fontsize=10)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def gaps(rows) -> list[dict]:
  """Per axis value and series other than the first: ``{x, series, gap, error}``, the
  difference of mean accuracies (this series minus the first, in points) and its standard
  error ``sqrt(s1²/n1 + s2²/n2)`` from the sample variances over seeds."""
  series = _series(rows)
  baseline_name, *others = series
  baseline = {r["x"]: r for r in series[baseline_name]}
  out = []
  for name in others:
    for row in series[name]:
      base = baseline.get(row["x"])
      if base is None:
        continue
      variance = sum(np.var(r["accuracies"], ddof=1) / len(r["accuracies"])
                     for r in (row, base) if len(r["accuracies"]) > 1)
      out.append(dict(x=row["x"], series=name, baseline=baseline_name,
                      gap=100 * (np.mean(row["accuracies"]) - np.mean(base["accuracies"])),
                      error=100 * float(np.sqrt(variance))))
  return out


def _gap_table(rows) -> list[str]:
  lines = ["| width | model | − conv baseline (points) | seeds |", "|---|---|---|---|"]
  for g in gaps(rows):
    seeds = "/".join(str(len(r["accuracies"])) for r in rows
                     if r["x"] == g["x"] and r["series"] in (g["series"], g["baseline"]))
    lines.append(f"| {g['x']:g} | {g['series']} | {g['gap']:+.2f} ± {g['error']:.2f} | "
                 f"{seeds} |")
  return lines


def _learning_curves(path: str, ablation, rows, scalars) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  for color, row in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], rows):
    for ax, tag in zip(axes, ("train/loss", "eval/accuracy")):
      curves = [scalars[n][tag] for n in row["names"] if tag in scalars[n]]
      for steps, values in curves:
        ax.plot(steps, values, color=color, alpha=0.25, lw=0.8)
      if curves:
        length = min(len(steps) for steps, _ in curves)
        mean = np.mean([values[:length] for _, values in curves], axis=0)
        ax.plot(curves[0][0][:length], mean, color=color, lw=1.8, label=row["label"])
  axes[0].set(xlabel="step", ylabel="train loss (label-smoothed)", title="training loss")
  axes[1].set(xlabel="step", ylabel="test accuracy", title="test accuracy")
  for ax in axes:
    ax.grid(alpha=0.3)
  axes[1].legend(fontsize=8)
  fig.suptitle(ablation.title + " (thin: seeds, thick: mean)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(workdir: str, ablations: Sequence[Any],
          groups: Mapping[str, Mapping[str, Sequence[str]]],
          results: Mapping[str, Mapping[str, Any] | None], *, preset: str,
          budget: Mapping[str, Any], command: str) -> str:
  """Writes ``workdir/report.md`` and its PNGs (``<ablation>.png``,
  ``<ablation>_curves.png``); returns the report's path.

  Args:
    workdir: the sweep's directory, one sub-directory per run.
    ablations: ``fashion_mnist.Ablation``s, in report order.
    groups: ``{ablation name: {variant label: [run name per seed]}}``.
    results: ``{run name: its result.json, or None if unfinished}``.
    preset, budget, command: what the sweep ran, for the header.
  """
  scalars = {name: read_scalars(os.path.join(workdir, name))
             for name, result in results.items() if result}
  seconds = sum(r["seconds"] for r in results.values() if r)
  lines = [
      "# SASA ablations on Fashion-MNIST",
      "",
      f"- Command: `{command}`",
      f"- Budget (`{preset}`, every run): "
      + ", ".join(f"`{k}={v!r}`" for k, v in budget.items()),
      f"- Runs: {sum(bool(r) for r in results.values())} of {len(results)}; training wall "
      f"time {seconds / 60:.1f} min in total (compilation and evaluation included)",
      f"- Machine: {common.machine()}",
      f"- Date: {datetime.date.today().isoformat()}",
      "",
      "Test accuracy on the eval split (mean ± sample std over seeds); params and FLOPs "
      "(2 × multiply-adds) per 28×28 image from `sasa_jax.models.flops`; images/s: the "
      "median training throughput over the logged intervals. The paper's numbers are "
      "ResNet-50 on ImageNet, for the direction of each trend only.",
  ]
  for ablation in ablations:
    rows = _variant_rows(ablation, groups[ablation.name], results, scalars)
    lines += ["", f"## {ablation.title}", "", ablation.question, ""]
    if not rows:
      lines.append("No finished runs yet.")
      continue
    lines += _table(rows)
    if all(row["series"] for row in rows):  # An ablation along an axis.
      lines += ["", "The gap, mean accuracy minus the conv baseline's at the same width, "
                "± its standard error:", ""] + _gap_table(rows)
      _accuracy_plot(os.path.join(workdir, f"{ablation.name}.png"), ablation, rows)
    else:
      _bar_chart(os.path.join(workdir, f"{ablation.name}.png"), ablation, rows)
    _learning_curves(os.path.join(workdir, f"{ablation.name}_curves.png"), ablation, rows,
                     scalars)
    lines += ["", f"![{ablation.name}]({ablation.name}.png)",
              f"![{ablation.name} learning curves]({ablation.name}_curves.png)"]
  path = os.path.join(workdir, REPORT_FILE)
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(lines) + "\n")
  os.replace(path + ".tmp", path)
  return path
