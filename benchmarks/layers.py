"""Layer benchmark: the SASA layer's implementations vs a 3×3 conv vs a PyTorch unfold layer.

    python -m benchmarks.layers            # --quick: the target configuration
    python -m benchmarks.layers --full     # the grid C x H x k (+ the plot against k)
    python -m benchmarks.layers --vs-k     # just H=32, C=64, k = 3..11 and the plot
    python -m benchmarks.layers --options  # dilation 2 and shifted borders vs today's op

Every JAX alternative is a whole layer on NHWC input, projections included:
``LocalSelfAttention(C, num_heads, kernel_size=k, implementation=name)`` for each name in
``sasa_jax.ops.IMPLEMENTATIONS`` (the default layer, ``implementation=None``, is the one
``ops.default_implementation(H, W, k, backend, C // heads)`` names: it is marked, not
timed twice), and ``flax.linen.Conv(C, (3, 3), use_bias=False)``. When torch is installed,
the same SASA layer written the way the popular PyTorch re-implementations write it
(``benchmarks.torch_sasa``) runs on NCHW input in the same process.

``fwd`` is the forward pass (torch under ``no_grad``); ``fwd+bwd`` is forward and backward
with a fixed random output cotangent, giving the gradients of all parameters and of the
input. Timing: ``benchmarks.common.time_interleaved`` (compile excluded, interleaved
rounds, medians). Memory: JAX, XLA's compiled memory analysis (arguments + outputs +
temporaries); torch, the peak of ``torch.profiler``'s allocation events during one call
plus the inputs and parameters already live. The op alone at the models' shapes:
``benchmarks.op_shapes``; where the layer's time goes: ``benchmarks.layer_parts``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

from benchmarks import common
from benchmarks import torch_sasa
from sasa_jax import ops
from sasa_jax.layers import LocalSelfAttention

MODES = ("fwd", "fwd+bwd")
CONV = "conv 3×3"
# The target configuration: batch 8, 32x32, 64 -> 64 channels, k = 7, 8 heads.
TARGET = dict(batch=8, size=32, channels=64, kernel=7, heads=8)


def check_implementations(batch=2, size=11, channels=32, heads=4, kernel=5) -> dict[str, float]:
  """Max abs difference of each implementation's layer output from ``reference``."""
  x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
  outputs = {}
  for name in ops.IMPLEMENTATIONS:
    module = LocalSelfAttention(channels, num_heads=heads, kernel_size=kernel,
                                implementation=name)
    outputs[name] = module.apply(module.init(jax.random.key(0), x), x)
  return {name: float(jnp.abs(out - outputs["reference"]).max())
          for name, out in outputs.items() if name != "reference"}


# ----------------------------------------------------------------------------- one config


def _jax_alternative(module, x, g, mode):
  """Compiled function, its arguments and its XLA peak bytes, for one flax module."""
  params = module.init(jax.random.key(0), x)
  if mode == "fwd":
    fn, args = module.apply, (params, x)
  else:
    def fn(params, x, g):
      _, vjp = jax.vjp(module.apply, params, x)
      return vjp(g)
    args = (params, x, g)
  compiled = jax.jit(fn).lower(*args).compile()
  return common.jax_runner(compiled, *args), common.jax_peak_bytes(compiled)


def bench_layer_config(batch, size, channels, kernel, heads, *, repeats, use_torch, max_mib,
                       dense_max_ratio=math.inf, modes=MODES,
                       log=print) -> dict[str, dict[str, common.Result]]:
  """``{mode: {alternative: Result}}`` for one shape, alternatives timed interleaved."""
  x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
  g = jax.random.normal(jax.random.key(2), (batch, size, size, channels))
  names = list(ops.IMPLEMENTATIONS) + [CONV] + ([torch_sasa.NAME] if use_torch else [])
  results = {}
  for mode in modes:
    runs, res = {}, {}
    for name in names:
      reason = common.skip_reason(name, batch, size, channels, kernel, heads, max_mib,
                                  dense_max_ratio)
      if reason:
        res[name] = common.Result(skipped=reason)
        continue
      if name == torch_sasa.NAME:
        runs[name], peak = torch_sasa.runner(channels, heads, kernel, x, g, mode)
      else:
        module = (nn.Conv(channels, (3, 3), use_bias=False) if name == CONV else
                  LocalSelfAttention(channels, num_heads=heads, kernel_size=kernel,
                                     implementation=name))
        runs[name], peak = _jax_alternative(module, x, g, mode)
      res[name] = common.Result(peak_bytes=peak)
    for name, t in common.time_interleaved(runs, repeats=repeats).items():
      res[name].time_s = t
    results[mode] = res
    log(f"  B={batch} H=W={size} C={channels} k={kernel} {mode}: " + ", ".join(
        f"{n} {common.fmt_ms(r.time_s)} ms" for n, r in res.items() if r.time_s))
  return results


# (label, dilation, borders): the window options against today's SASA window.
OPTIONS = (("today's (dilation 1, borders='exclude')", 1, "exclude"),
           ("dilation=2", 2, "exclude"),
           ("borders='shift'", 1, "shift"),
           ("dilation=2, borders='shift'", 2, "shift"))


def bench_options(batch, size, channels, kernel, heads, *, repeats
                  ) -> dict[str, common.Result]:
  """``{option: Result}``: the layer's fwd+bwd with each of ``OPTIONS`` (automatic
  implementation) and a 3x3 conv, timed interleaved."""
  x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
  g = jax.random.normal(jax.random.key(2), (batch, size, size, channels))
  modules = {label: LocalSelfAttention(channels, num_heads=heads, kernel_size=kernel,
                                       dilation=dilation, borders=borders)
             for label, dilation, borders in OPTIONS}
  modules[CONV] = nn.Conv(channels, (3, 3), use_bias=False)
  runs, res = {}, {}
  for label, module in modules.items():
    runs[label], peak = _jax_alternative(module, x, g, "fwd+bwd")
    res[label] = common.Result(peak_bytes=peak)
  for label, t in common.time_interleaved(runs, repeats=repeats).items():
    res[label].time_s = t
  return res


def options_table(res: dict[str, common.Result], size: int, kernel: int, heads: int,
                  channels: int) -> str:
  today = res[OPTIONS[0][0]]
  rows = []
  for label, dilation, borders in (*OPTIONS, (CONV, None, None)):
    r = res[label]
    used = "—" if borders is None else common.default_implementation(
        -(-size // dilation), kernel, channels, heads, borders)
    rows.append([label, used, common.fmt_ms(r.time_s),
                 common.fmt_ratio(r.time_s / today.time_s), common.fmt_mib(r.peak_bytes),
                 common.fmt_ratio(r.peak_bytes / today.peak_bytes)])
  return common.markdown_table(
      ["layer", "implementation (automatic)", "fwd+bwd ms", "÷ today's", "peak MiB",
       "÷ today's"], rows)


# ----------------------------------------------------------------------------- tables


def _cell(value, default, fmt):
  if value is None:
    return "—"
  return f"{fmt(value)} ({common.fmt_ratio(value / default)})" if default else fmt(value)


def layer_tables(rows, use_torch: bool) -> str:
  """Markdown: per mode, a time table and a memory table (cells: value (× default))."""
  impls = list(ops.IMPLEMENTATIONS)
  alts = impls + [CONV] + ([torch_sasa.NAME] if use_torch else [])
  out, skips = [], set()
  for mode in MODES:
    for what, attr, fmt, unit in (("time", "time_s", common.fmt_ms, "ms"),
                                  ("peak memory", "peak_bytes", common.fmt_mib, "MiB")):
      header = ["C", "H=W", "k", "default"] + [f"{a} {unit}" for a in alts]
      header += ["default ÷ conv"] + (["default ÷ torch"] if use_torch else [])
      body = []
      for r in rows:
        res = r["results"].get(mode)
        if res is None:
          continue
        default = getattr(res[r["default"]], attr)
        cells = []
        for a in alts:
          if res[a].skipped:
            cells.append("skip")
            skips.add(a)
          else:
            c = _cell(getattr(res[a], attr), default, fmt)
            cells.append(f"**{c}**" if a == r["default"] else c)
        ratios = [common.fmt_ratio(default / getattr(res[CONV], attr))]
        if use_torch:
          t = getattr(res[torch_sasa.NAME], attr)
          ratios.append(common.fmt_ratio(default / t) if t else "—")
        body.append([r["channels"], r["size"], r["kernel"], r["default"]] + cells + ratios)
      if not body:
        continue
      out.append(f"**{mode}, {what}** ({unit}; in brackets: ÷ the default layer, in bold)\n")
      out.append(common.markdown_table(header, body))
      out.append("")
  if skips:
    copy = [a for a in (*common.WINDOW_COPY_IMPLEMENTATIONS, torch_sasa.NAME) if a in skips]
    notes = []
    if copy:
      notes.append(f"{', '.join(copy)} where the k²-fold copy of K (B·H·W·C·k² floats) "
                   f"exceeds --max-mib ({rows[0].get('max_mib', 256):g} MiB)")
    if "dense" in skips:
      ratio = rows[0].get("dense_max_ratio")
      notes.append("dense where its (HW)² logits exceed --max-mib" + (
          f", or where HW > {ratio}·k² (pointless: dense is for windows covering most of "
          f"the image)" if ratio else ""))
    if "fused" in skips:
      notes.append("fused off GPU (Pallas interpret mode: a test path, not a performance "
                   "option)")
    out.append("skip: not run, " + "; ".join(notes) + ".")
  return "\n".join(out)


# ----------------------------------------------------------------------------- plot


def plot_vs_k(rows, path: str, use_torch: bool, size: int, channels: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sel = sorted((r for r in rows if r["size"] == size and r["channels"] == channels),
               key=lambda r: r["kernel"])
  if not sel:
    return
  alts = list(ops.IMPLEMENTATIONS) + [CONV] + ([torch_sasa.NAME] if use_torch else [])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, (attr, scale, label) in zip(axes, (("time_s", 1e3, "fwd+bwd time (ms)"),
                                             ("peak_bytes", 1 / common.MiB,
                                              "fwd+bwd peak memory (MiB)"))):
    for a in alts:
      pts = [(r["kernel"], getattr(r["results"]["fwd+bwd"][a], attr)) for r in sel]
      pts = [(k, v * scale) for k, v in pts if v]
      if pts:
        style = dict(linestyle="--") if a in (CONV, torch_sasa.NAME) else {}
        ax.plot(*zip(*pts), marker="o", label=a, **style)
    ax.set_yscale("log")
    ax.set_xlabel("window k")
    ax.set_ylabel(label)
    ax.set_xticks([r["kernel"] for r in sel])
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend()
  fig.suptitle(f"SASA layer, batch {sel[0]['batch']}, {size}×{size}, {channels}→{channels} "
               f"channels, 8 heads, {common.machine_cores()} CPU cores")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  print(f"wrote {path}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  what = parser.add_mutually_exclusive_group()
  what.add_argument("--quick", action="store_true",
                    help="only the target configuration (the default)")
  what.add_argument("--full", action="store_true",
                    help="the grid C in {64,256} x H in {14,32,56} x k in {3,7,11} (plus "
                    "k=5,9 at H=32, C=64 for the plot)")
  what.add_argument("--vs-k", action="store_true",
                    help="only H=32, C=64, k in {3,5,7,9,11}, and the plot against k")
  what.add_argument("--options", action="store_true",
                    help="the target shape with dilation 2 and shifted borders against "
                    "today's window, fwd+bwd, one interleaved run")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=None,
                      help="timing rounds (default: 15 quick, 5 otherwise)")
  parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch layer")
  parser.add_argument("--max-mib", type=float, default=256,
                      help="skip an alternative whose k²-fold window copy (or (HW)² logits "
                      "for dense) exceeds this many MiB (default 256)")
  parser.add_argument("--plot", default="benchmarks/layer_vs_k.png",
                      help="where --full saves the plot against k ('' for none)")
  parser.add_argument("--json", default=None, help="also write the raw results here")
  args = parser.parse_args(argv)

  torch = None if args.no_torch else common.try_import_torch()
  if torch is not None:
    torch.set_num_threads(common.machine_cores())
  use_torch = torch is not None
  repeats = args.repeats or (5 if args.full else 9 if args.vs_k else 15)
  print(f"Machine: {common.machine()}")
  print(f"Command: python -m benchmarks.layers {' '.join(sys.argv[1:] if argv is None else argv)}")
  started = time.time()

  print("\nCorrectness (max |Δ| vs reference, small input with borders):")
  print("  implementations:", {k: f"{v:.1e}" for k, v in check_implementations().items()})
  if use_torch:
    print("  torch unfold layer (weights copied):",
          {k: f"{v:.1e}" for k, v in torch_sasa.check_torch_layer().items()})
  else:
    print("  torch is not installed: no PyTorch unfold layer in this run.")

  if args.options:
    size, channels, kernel = TARGET["size"], TARGET["channels"], TARGET["kernel"]
    res = bench_options(args.batch, size, channels, kernel, args.heads, repeats=repeats)
    print(f"\nThe window options, fwd+bwd of the layer, batch {args.batch}, {size}×{size}, "
          f"{channels}→{channels} channels, k={kernel}, {args.heads} heads:\n")
    print(options_table(res, size, kernel, args.heads, channels))
    return 0
  rows = []
  if args.full:
    configs = [(c, h, k) for c in (64, 256) for h in (14, 32, 56) for k in (3, 7, 11)]
    configs += [(64, 32, 5), (64, 32, 9)]
    configs.sort()
  elif args.vs_k:
    configs = [(64, 32, k) for k in (3, 5, 7, 9, 11)]
  else:
    configs = [(TARGET["channels"], TARGET["size"], TARGET["kernel"])]
  print(f"\nLayers, batch {args.batch}, {args.heads} heads, C -> C channels:")
  for channels, size, kernel in configs:
    res = bench_layer_config(args.batch, size, channels, kernel, args.heads,
                             repeats=repeats, use_torch=use_torch, max_mib=args.max_mib,
                             dense_max_ratio=8 if (args.full or args.vs_k) else math.inf)
    rows.append(dict(batch=args.batch, size=size, channels=channels, kernel=kernel,
                     heads=args.heads,
                     default=common.default_implementation(size, kernel, channels, args.heads),
                     dense_max_ratio=8 if (args.full or args.vs_k) else None,
                     max_mib=args.max_mib,
                     results=res))
  print()
  print(layer_tables(rows, use_torch))
  target = [r for r in rows if (r["channels"], r["size"], r["kernel"]) == (
      TARGET["channels"], TARGET["size"], TARGET["kernel"])]
  if target and args.batch == TARGET["batch"] and args.heads == TARGET["heads"]:
    res = target[0]["results"]["fwd+bwd"]
    default = res[target[0]["default"]].time_s
    print(f"\nTarget (batch 8, 32×32, 64→64, k=7, 8 heads, fwd+bwd): default layer "
          f"({target[0]['default']}) {common.fmt_ms(default)} ms")
    conv = default / res[CONV].time_s
    print(f"  default ÷ conv 3×3 = {conv:.2f}  (target ≤ 8, stretch ≤ 2): "
          f"{'met' if conv <= 8 else 'NOT met'}{', stretch met' if conv <= 2 else ''}")
    if use_torch:
      tr = default / res[torch_sasa.NAME].time_s
      print(f"  default ÷ torch unfold = {tr:.3f} = 1/{1 / tr:.1f}  (target ≤ 1/4, stretch "
            f"≤ 1/10): {'met' if tr <= 0.25 else 'NOT met'}"
            f"{', stretch met' if tr <= 0.1 else ''}")
  if (args.full or args.vs_k) and args.plot:
    plot_vs_k(rows, args.plot, use_torch, 32, 64)
  print(f"\nTotal wall time {time.time() - started:.0f} s.")
  if args.json:
    common.write_json(args.json, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
