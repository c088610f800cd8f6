"""Shared helpers of the benchmarks: interleaved timing, peak-memory measures, tables.

Timing protocol (the machine is shared and noisy): every alternative is compiled and run
once before any timing (compilation is excluded); then the alternatives are timed in
interleaved rounds -- round ``r`` runs each alternative once, in an order rotated every
round -- and each reports the median over rounds of its per-call time. An alternative that
takes only a few milliseconds is run ``inner`` times back to back per sample, so that a
sample lasts at least ``min_sample_s``; a slow one gets fewer rounds (at least 3).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import jax

from sasa_jax import ops

MiB = 2**20


def machine_cores() -> int:
  """CPU cores this process may run on."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def machine() -> str:
  """One line naming the CPU, the core count and the library versions."""
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
      cpu = names[0]
  except OSError:
    pass
  parts = [f"{cpu}, {machine_cores()} cores", f"Python {platform.python_version()}",
           f"jax {jax.__version__} ({jax.default_backend()})"]
  if jax.default_backend() != "cpu":
    parts.insert(1, f"{jax.device_count()}× {jax.devices()[0].device_kind}")
  try:
    import flax
    parts.append(f"flax {flax.__version__}")
  except ImportError:
    pass
  torch = try_import_torch()
  if torch is not None:
    parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
  return "; ".join(parts)


def try_import_torch():
  """``torch`` if it is installed, else ``None``."""
  try:
    import torch
  except ImportError:
    return None
  return torch


def time_interleaved(runs: Mapping[str, Callable[[], object]], repeats: int = 7,
                     min_sample_s: float = 0.05, slow_budget_s: float = 6.0
                     ) -> dict[str, float]:
  """Median seconds per call of each ``runs[name]()``, timed in interleaved rounds.

  Args:
    runs: name -> a callable that runs the computation once and blocks until its result is
      ready. Each is called once more here before timing (a warm-up).
    repeats: rounds (samples per alternative), fewer for slow ones (see ``slow_budget_s``).
    min_sample_s: a fast alternative runs ``inner`` times per sample, at least this long.
    slow_budget_s: an alternative whose call takes ``t`` gets
      ``min(repeats, max(3, slow_budget_s / t))`` rounds.
  """
  inner, rounds, samples = {}, {}, {}
  for name, run in runs.items():
    run()  # warm-up (caches, allocator)
    start = time.perf_counter()
    run()
    once = time.perf_counter() - start
    inner[name] = max(1, math.ceil(min_sample_s / max(once, 1e-6)))
    rounds[name] = min(repeats, max(3, int(slow_budget_s / max(once, 1e-6))))
    # A slow alternative's calibration call is a sample too (it ran after the warm-up).
    samples[name] = [once] if once >= min_sample_s and rounds[name] < repeats else []
  names = list(runs)
  for r in range(max(rounds.values(), default=0)):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      if len(samples[name]) >= rounds[name]:
        continue
      run, n = runs[name], inner[name]
      start = time.perf_counter()
      for _ in range(n):
        run()
      samples[name].append((time.perf_counter() - start) / n)
  return {name: statistics.median(s) for name, s in samples.items()}


def jax_runner(compiled, *args) -> Callable[[], object]:
  """A no-argument callable running a compiled JAX function and blocking on its result."""
  return lambda: jax.block_until_ready(compiled(*args))


def jax_peak_bytes(compiled) -> int | None:
  """XLA's compiled memory analysis: arguments + outputs + temporaries - aliased bytes.

  The peak of the buffers that XLA's buffer assignment holds for one call, including the
  inputs and parameters (arguments) and the results; ``None`` where the backend has no
  analysis.
  """
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None
  return (analysis.argument_size_in_bytes + analysis.output_size_in_bytes +
          analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)


def torch_peak_bytes(run: Callable[[], object], live_before: int) -> int:
  """Peak live CPU allocations of one ``run()`` from ``torch.profiler``'s memory events.

  The running sum of the profiler's allocation (+) and free (-) events during the call,
  maximised over time, plus ``live_before``: the bytes of the tensors already live that the
  call uses (inputs, parameters, cotangent), so that the number is comparable with
  ``jax_peak_bytes`` (arguments + outputs + temporaries).
  """
  from torch.profiler import ProfilerActivity, profile

  with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    run()
  events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
  live = peak = 0
  for event in sorted(events, key=lambda e: e.start_ns()):
    live += event.nbytes()
    peak = max(peak, live)
  return live_before + peak


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]],
                   align: Sequence[str] | None = None) -> str:
  """A GitHub markdown table; ``align`` is one of 'l', 'r' per column (default: right,
  left for the first column)."""
  if align is None:
    align = ["l"] + ["r"] * (len(header) - 1)
  rule = ["---:" if a == "r" else ":---" for a in align]
  lines = ["| " + " | ".join(str(h) for h in header) + " |", "| " + " | ".join(rule) + " |"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def fmt_ms(seconds: float | None) -> str:
  if seconds is None:
    return "—"
  ms = seconds * 1e3
  return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_mib(nbytes: int | None) -> str:
  if nbytes is None:
    return "—"
  mib = nbytes / MiB
  return f"{mib:.3g}" if mib < 100 else f"{mib:.0f}"


def fmt_ratio(x: float | None) -> str:
  if x is None:
    return "—"
  return f"{x:.2g}×" if x < 10 else f"{x:.0f}×"


# ----------------------------------------------------------------------------- the op

# Implementations that hold a k^2-fold copy of K and V (skipped where it is too large).
WINDOW_COPY_IMPLEMENTATIONS = ("reference", "patches")


@dataclasses.dataclass
class Result:
  """One alternative at one shape: its median time, its peak memory, or why it was not run."""

  time_s: float | None = None
  peak_bytes: int | None = None
  skipped: str | None = None


def default_implementation(size: int, kernel: int, channels: int, heads: int,
                           borders: str = "exclude") -> str:
  """What ``implementation=None`` runs for a ``size``-square image on this backend."""
  return ops.default_implementation(size, size, kernel, jax.default_backend(),
                                    channels // heads, borders)


def skip_reason(name: str, batch: int, size: int, channels: int, kernel: int, heads: int,
                max_mib: float, dense_max_ratio: float = math.inf) -> str | None:
  """Why an implementation is not run at this shape (memory, or pointless), or None."""
  if name == "fused" and jax.default_backend() != "gpu":
    return "Pallas interpret mode off GPU: a test path, not a performance option"
  if name in WINDOW_COPY_IMPLEMENTATIONS:
    copy = batch * size * size * channels * kernel * kernel * 4
    if copy > max_mib * MiB:
      return f"k²-fold copy of K is {copy / MiB:.0f} MiB"
  if name == "dense":
    logits = batch * heads * (size * size)**2 * 4
    if logits > max_mib * MiB:
      return f"(HW)² logits are {logits / MiB:.0f} MiB"
    if size * size > dense_max_ratio * kernel * kernel:
      return (f"pointless: HW/k² = {size * size / kernel**2:.0f}× the logits of the window "
              f"(dense is for windows covering most of the image)")
  return None


def op_inputs(batch: int, size: int, channels: int, heads: int, kernel: int):
  """``((q, k, v, rel_h, rel_w), cotangent)``: random normal, float32, a square image."""
  depth = channels // heads
  keys = jax.random.split(jax.random.key(0), 6)
  shape = (batch, size, size, heads, depth)
  q, k, v, g = (jax.random.normal(keys[i], shape) for i in range(4))
  rel_h = jax.random.normal(keys[4], (kernel, depth // 2)) * depth**-0.5
  rel_w = jax.random.normal(keys[5], (kernel, depth // 2)) * depth**-0.5
  return (q, k, v, rel_h, rel_w), g


def compiled_vjp(fn: Callable[..., object], args, cotangent):
  """``(run, peak bytes)``: the gradients of ``fn`` at ``args`` for ``cotangent`` (forward
  and backward), compiled; ``run()`` computes them and blocks."""
  grad_fn = lambda *a: jax.vjp(fn, *a[:-1])[1](a[-1])
  compiled = jax.jit(grad_fn).lower(*args, cotangent).compile()
  return jax_runner(compiled, *args, cotangent), jax_peak_bytes(compiled)


def write_json(path: str, rows) -> None:
  """The raw results of a run (``Result``s as dicts), with the machine."""
  def plain(o):
    if isinstance(o, Result):
      return dataclasses.asdict(o)
    if isinstance(o, dict):
      return {k: plain(v) for k, v in o.items()}
    if isinstance(o, list):
      return [plain(v) for v in o]
    return o
  with open(path, "w") as f:
    json.dump(dict(machine=machine(), rows=plain(rows)), f, indent=1)
