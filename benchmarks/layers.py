"""Layer benchmark: SASA implementations vs a 3x3 conv vs a PyTorch unfold SASA layer.

    python -m benchmarks.layers            # --quick: the issue's target configuration
    python -m benchmarks.layers --full     # the grid C x H x k (+ the plot against k)
    python -m benchmarks.layers --vs-k     # just H=32, C=64, k = 3..11 and the plot
    python -m benchmarks.layers --shapes   # op-level fwd+bwd at the shapes the models use
    python -m benchmarks.layers --crossover  # op-level blocked, shifted, dense around H*W ~ k^2
    python -m benchmarks.layers --ablate   # where the default layer's time goes

Every JAX alternative is a whole layer on NHWC input, projections included:
``LocalSelfAttention(C, num_heads, kernel_size=k, implementation=name)`` for each name in
``sasa_jax.ops.IMPLEMENTATIONS`` (the default layer, ``implementation=None``, is the one
``ops.default_implementation(H, W, k, backend, C // heads)`` names: it is marked, not
timed twice), and ``flax.linen.Conv(C, (3, 3), use_bias=False)``. When torch is installed,
the same SASA layer written the way the popular PyTorch re-implementations write it -- K
and V unfolded into ``k x k`` windows with ``F.unfold`` (a ``k^2``-fold copy) -- but with
the paper's semantics (dot-product logits, relative row/column logits on the query halves,
border keys masked out of the softmax) runs on NCHW input in the same process; it is
checked once against our ``reference`` implementation with the weights copied across.

``fwd`` is the forward pass (torch under ``no_grad``); ``fwd+bwd`` is forward and backward
with a fixed random output cotangent, giving the gradients of all parameters and of the
input. Timing: ``benchmarks.common.time_interleaved`` (compile excluded, interleaved
rounds, medians). Memory: JAX, XLA's compiled memory analysis (arguments + outputs +
temporaries); torch, the peak of ``torch.profiler``'s allocation events during one call
plus the inputs and parameters already live.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from sasa_jax import ops
from sasa_jax.layers import LocalSelfAttention
from sasa_jax.ops import _contract
from sasa_jax.ops import blocked as blocked_ops

MODES = ("fwd", "fwd+bwd")
TORCH = "torch unfold"
CONV = "conv 3×3"
# The target configuration of the issue: batch 8, 32x32, 64 -> 64 channels, k = 7, 8 heads.
TARGET = dict(batch=8, size=32, channels=64, kernel=7, heads=8)
WINDOW_COPY_IMPLEMENTATIONS = ("reference", "patches", TORCH)


# ----------------------------------------------------------------------------- torch layer

def torch_unfold_layer(channels: int, features: int, num_heads: int, kernel_size: int):
  """The PyTorch unfold SASA layer (NCHW), built lazily so that torch stays optional."""
  import torch
  import torch.nn.functional as F

  class TorchUnfoldSASA(torch.nn.Module):
    """SASA as popular PyTorch re-implementations write it (``F.unfold`` of K and V into
    ``k x k`` windows), with the paper's semantics: dot-product logits, relative row and
    column logits on the two halves of each query, border keys masked out."""

    def __init__(self):
      super().__init__()
      depth = features // num_heads
      self.heads, self.depth, self.k = num_heads, depth, kernel_size
      self.query = torch.nn.Conv2d(channels, features, 1, bias=False)
      self.key = torch.nn.Conv2d(channels, features, 1, bias=False)
      self.value = torch.nn.Conv2d(channels, features, 1, bias=False)
      self.rel_h = torch.nn.Parameter(torch.randn(kernel_size, depth // 2) * depth**-0.5)
      self.rel_w = torch.nn.Parameter(torch.randn(kernel_size, depth // 2) * depth**-0.5)
      self._masks = {}

    def _mask(self, height, width, device):
      """``(k*k, H*W)`` bool: window slot inside the image (unfold of an all-ones image)."""
      if (height, width) not in self._masks:
        ones = torch.ones(1, 1, height, width, device=device)
        self._masks[height, width] = F.unfold(ones, self.k, padding=self.k // 2)[0] > 0.5
      return self._masks[height, width]

    def forward(self, x):
      batch, _, height, width = x.shape
      n, d, k, pixels = self.heads, self.depth, self.k, height * width
      q = self.query(x).view(batch, n, d, pixels)
      keys = F.unfold(self.key(x), k, padding=k // 2).view(batch, n, d, k * k, pixels)
      values = F.unfold(self.value(x), k, padding=k // 2).view(batch, n, d, k * k, pixels)
      logits = torch.einsum("bndp,bndkp->bnkp", q, keys)
      logit_h = torch.einsum("bndp,td->bntp", q[:, :, :d // 2], self.rel_h)
      logit_w = torch.einsum("bndp,td->bntp", q[:, :, d // 2:], self.rel_w)
      positional = (logit_h[:, :, :, None] + logit_w[:, :, None, :]).reshape(
          batch, n, k * k, pixels)
      logits = (logits + positional) * d**-0.5
      logits = logits.masked_fill(~self._mask(height, width, x.device), float("-inf"))
      probs = logits.softmax(dim=2)
      out = torch.einsum("bnkp,bndkp->bndp", probs, values)
      return out.reshape(batch, n * d, height, width)

  return TorchUnfoldSASA()


def copy_weights_to_torch(params, layer) -> None:
  """Copies a ``LocalSelfAttention``'s parameters into ``TorchUnfoldSASA``."""
  import torch
  p = params["params"]
  with torch.no_grad():
    for name in ("query", "key", "value"):
      kernel = np.asarray(p[name]["kernel"])  # (C, N, d)
      weight = kernel.reshape(kernel.shape[0], -1).T[:, :, None, None]
      getattr(layer, name).weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
    layer.rel_h.copy_(torch.from_numpy(np.array(p["rel_h"])))
    layer.rel_w.copy_(torch.from_numpy(np.array(p["rel_w"])))


def check_torch_layer(batch=2, size=11, channels=32, heads=4, kernel=5) -> dict[str, float]:
  """Max abs differences of the torch layer vs our ``reference`` (weights copied): output,
  input gradient and ``rel_h`` gradient, on a small input whose borders matter."""
  import torch
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
  g = rng.standard_normal((batch, size, size, channels)).astype(np.float32)
  module = LocalSelfAttention(channels, num_heads=heads, kernel_size=kernel,
                              implementation="reference")
  params = module.init(jax.random.key(0), x)
  out, vjp = jax.vjp(module.apply, params, x)
  grad_params, grad_x = vjp(g)

  layer = torch_unfold_layer(channels, channels, heads, kernel)
  copy_weights_to_torch(params, layer)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
  out_t = layer(xt)
  out_t.backward(torch.from_numpy(g.transpose(0, 3, 1, 2).copy()))
  to_nhwc = lambda t: t.detach().numpy().transpose(0, 2, 3, 1)
  return {
      "output": float(np.abs(to_nhwc(out_t) - np.asarray(out)).max()),
      "grad input": float(np.abs(to_nhwc(xt.grad) - np.asarray(grad_x)).max()),
      "grad rel_h": float(np.abs(layer.rel_h.grad.numpy() -
                                 np.asarray(grad_params["params"]["rel_h"])).max()),
      "output scale": float(np.abs(np.asarray(out)).max()),
  }


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

@dataclasses.dataclass
class Result:
  time_s: float | None = None
  peak_bytes: int | None = None
  skipped: str | None = None


def _skip_reason(name: str, batch: int, size: int, channels: int, kernel: int, heads: int,
                 max_mib: float, dense_max_ratio: float = math.inf) -> str | None:
  """Why an alternative is not run at this shape (memory, or pointless), or None."""
  if name == "fused" and jax.default_backend() != "gpu":
    return "Pallas interpret mode off GPU: a test path, not a performance option"
  if name in WINDOW_COPY_IMPLEMENTATIONS:
    copy = batch * size * size * channels * kernel * kernel * 4
    if copy > max_mib * common.MiB:
      return f"k²-fold copy of K is {copy / common.MiB:.0f} MiB"
  if name == "dense":
    logits = batch * heads * (size * size)**2 * 4
    if logits > max_mib * common.MiB:
      return f"(HW)² logits are {logits / common.MiB:.0f} MiB"
    if size * size > dense_max_ratio * kernel * kernel:
      return (f"pointless: HW/k² = {size * size / kernel**2:.0f}× the logits of the window "
              f"(dense is for windows covering most of the image)")
  return None


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


def _torch_alternative(channels, heads, kernel, x_nhwc, g_nhwc, mode):
  import torch
  layer = torch_unfold_layer(channels, channels, heads, kernel)
  x = torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2).copy())
  g = torch.from_numpy(np.asarray(g_nhwc).transpose(0, 3, 1, 2).copy())
  param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
  nbytes = lambda t: t.numel() * t.element_size()
  if mode == "fwd":
    def run():
      with torch.no_grad():
        return layer(x)
    live = param_bytes + nbytes(x)
  else:
    x.requires_grad_(True)

    def run():
      layer.zero_grad(set_to_none=True)
      x.grad = None
      layer(x).backward(g)
    live = param_bytes + nbytes(x) + nbytes(g)
  run()
  return run, common.torch_peak_bytes(run, live)


def bench_layer_config(batch, size, channels, kernel, heads, *, repeats, use_torch, max_mib,
                       dense_max_ratio=math.inf, modes=MODES,
                       log=print) -> dict[str, dict[str, Result]]:
  """``{mode: {alternative: Result}}`` for one shape, alternatives timed interleaved."""
  x = jax.random.normal(jax.random.key(1), (batch, size, size, channels))
  g = jax.random.normal(jax.random.key(2), (batch, size, size, channels))
  names = list(ops.IMPLEMENTATIONS) + [CONV] + ([TORCH] if use_torch else [])
  results = {}
  for mode in modes:
    runs, res = {}, {}
    for name in names:
      reason = _skip_reason(name, batch, size, channels, kernel, heads, max_mib,
                            dense_max_ratio)
      if reason:
        res[name] = Result(skipped=reason)
        continue
      if name == TORCH:
        runs[name], peak = _torch_alternative(channels, heads, kernel, x, g, mode)
      else:
        module = (nn.Conv(channels, (3, 3), use_bias=False) if name == CONV else
                  LocalSelfAttention(channels, num_heads=heads, kernel_size=kernel,
                                     implementation=name))
        runs[name], peak = _jax_alternative(module, x, g, mode)
      res[name] = Result(peak_bytes=peak)
    for name, t in common.time_interleaved(runs, repeats=repeats).items():
      res[name].time_s = t
    results[mode] = res
    log(f"  B={batch} H=W={size} C={channels} k={kernel} {mode}: " + ", ".join(
        f"{n} {common.fmt_ms(r.time_s)} ms" for n, r in res.items() if r.time_s))
  return results


# ----------------------------------------------------------------------------- tables

def _cell(value, default, fmt):
  if value is None:
    return "—"
  return f"{fmt(value)} ({common.fmt_ratio(value / default)})" if default else fmt(value)


def layer_tables(rows, use_torch: bool) -> str:
  """Markdown: per mode, a time table and a memory table (cells: value (× default))."""
  impls = list(ops.IMPLEMENTATIONS)
  alts = impls + [CONV] + ([TORCH] if use_torch else [])
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
          t = getattr(res[TORCH], attr)
          ratios.append(common.fmt_ratio(default / t) if t else "—")
        body.append([r["channels"], r["size"], r["kernel"], r["default"]] + cells + ratios)
      if not body:
        continue
      out.append(f"**{mode}, {what}** ({unit}; in brackets: ÷ the default layer, in bold)\n")
      out.append(common.markdown_table(header, body))
      out.append("")
  if skips:
    copy = [a for a in WINDOW_COPY_IMPLEMENTATIONS if a in skips]
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


# ----------------------------------------------------------------------------- op level

# (group, H, C, heads, k): the spatial layers' shapes in the registered models. A stride-2
# SASA block attends at its input resolution, then pools.
MODEL_SHAPES = (
    [("ImageNet 224", h, c, 8, 7) for h, c in
     [(56, 64), (56, 128), (28, 128), (28, 256), (14, 256), (14, 512), (7, 512)]] +
    [("CIFAR 32", h, c, 8, 7) for h, c in
     [(32, 64), (32, 128), (16, 128), (16, 256), (8, 256), (8, 512), (4, 512)]] +
    [("ImageNet models at 64", h, c, 8, 7) for h, c in
     [(16, 64), (16, 128), (8, 128), (8, 256), (4, 256), (4, 512), (2, 512)]] +
    [("tiny digits 8", 8, 16, 4, 5), ("tiny digits 8", 8, 32, 4, 5)])

BLOCK_SIZES = (4, 8, 16)


def _op_variants():
  """name -> op with ``local_attention``'s signature (blocked at several block sizes)."""
  variants = {}
  for name in ops.IMPLEMENTATIONS:
    if name == "blocked":
      for b in BLOCK_SIZES:
        label = "blocked" if b == blocked_ops.DEFAULT_BLOCK_SIZE else f"blocked b={b}"

        def op(q, k, v, *, kernel_size, rel_h, rel_w, b=b):
          return blocked_ops.blocked(q, k, v, window=_contract.as_window(kernel_size),
                                     rel_h=rel_h, rel_w=rel_w, scale=q.shape[-1]**-0.5,
                                     block_size=b)
        variants[label] = op
    else:
      variants[name] = functools.partial(ops.local_attention, implementation=name)
  return variants


def _effective_block(name: str, size: int) -> int:
  """The block size a ``blocked`` variant uses on a ``size``-square image."""
  b = int(name.split("=")[1]) if "=" in name else blocked_ops.DEFAULT_BLOCK_SIZE
  return min(b, size)


def bench_op_shape(batch, size, channels, heads, kernel, *, repeats, max_mib,
                   dense_max_ratio=16, only=None, log=print):
  """``{variant: Result}``: op-level fwd+bwd (gradients of q, k, v, rel_h, rel_w)."""
  depth = channels // heads
  keys = jax.random.split(jax.random.key(0), 6)
  shape = (batch, size, size, heads, depth)
  q, k, v, g = (jax.random.normal(keys[i], shape) for i in range(4))
  rel_h = jax.random.normal(keys[4], (kernel, depth // 2)) * depth**-0.5
  rel_w = jax.random.normal(keys[5], (kernel, depth // 2)) * depth**-0.5
  runs, res, blocks_seen = {}, {}, set()
  for name, op in _op_variants().items():
    if only is not None and name not in only:
      continue
    base = name.split(" ")[0]
    reason = _skip_reason(base, batch, size, channels, kernel, heads, max_mib,
                          dense_max_ratio)
    if base == "blocked" and _effective_block(name, size) in blocks_seen:
      reason = "same as a smaller block size (blocks are min(b, H))"
    elif base == "blocked":
      blocks_seen.add(_effective_block(name, size))
    if reason:
      res[name] = Result(skipped=reason)
      continue

    def fn(q, k, v, rel_h, rel_w, g, op=op):
      f = lambda *a: op(*a[:3], kernel_size=kernel, rel_h=a[3], rel_w=a[4])
      return jax.vjp(f, q, k, v, rel_h, rel_w)[1](g)
    args = (q, k, v, rel_h, rel_w, g)
    compiled = jax.jit(fn).lower(*args).compile()
    runs[name] = common.jax_runner(compiled, *args)
    res[name] = Result(peak_bytes=common.jax_peak_bytes(compiled))
  for name, t in common.time_interleaved(runs, repeats=repeats).items():
    res[name].time_s = t
  log(f"  B={batch} H=W={size} C={channels} N={heads} k={kernel}: " + ", ".join(
      f"{n} {common.fmt_ms(r.time_s)}" for n, r in res.items() if r.time_s))
  return res


def _duplicate_blocks(row, names) -> set[str]:
  """The ``blocked`` variants whose effective block equals a smaller variant's."""
  dup, seen = set(), set()
  for n in sorted((n for n in names if n.startswith("blocked")),
                  key=lambda n: int(n.split("=")[1]) if "=" in n else row.get(
                      "default_block", blocked_ops.DEFAULT_BLOCK_SIZE)):
    b = int(n.split("=")[1]) if "=" in n else row.get("default_block",
                                                      blocked_ops.DEFAULT_BLOCK_SIZE)
    if min(b, row["size"]) in seen:
      dup.add(n)
    seen.add(min(b, row["size"]))
  return dup


def shapes_table(rows) -> str:
  names = [n for n in _op_variants() if any(n in r["results"] for r in rows)]
  header = (["models", "H=W", "C", "N", "k", "default"] + [f"{n} ms" for n in names] +
            ["fastest", "default ÷ fastest"])
  body = []
  for r in rows:
    res = r["results"]
    timed = {n: x.time_s for n, x in res.items() if x.time_s}
    dup = _duplicate_blocks(r, names)
    timed = {n: t for n, t in timed.items() if n not in dup}
    fastest = min(timed, key=timed.get)
    default = timed.get(r["default"])
    cells = []
    for n in names:
      x = res.get(n, Result(skipped="not asked for"))
      if n in dup:
        cells.append("=")
      elif x.skipped:
        cells.append("skip" if "same" not in x.skipped else "=")
      else:
        c = common.fmt_ms(x.time_s)
        cells.append(f"**{c}**" if n == r["default"] else c)
    body.append([r["group"], r["size"], r["channels"], r["heads"], r["kernel"], r["default"]] +
                cells + [fastest, common.fmt_ratio(default and default / timed[fastest])])
  mem_header = ["H=W", "C", "N", "k"] + [f"{n} MiB" for n in names]
  mem_body = []
  for r in rows:
    dup = _duplicate_blocks(r, names)
    mem_body.append([r["size"], r["channels"], r["heads"], r["kernel"]] + [
        "=" if n in dup else common.fmt_mib(r["results"][n].peak_bytes)
        if n in r["results"] and r["results"][n].time_s else "skip" for n in names])
  return (common.markdown_table(header, body) + "\n\nPeak memory (XLA memory analysis):\n\n" +
          common.markdown_table(mem_header, mem_body))


# (k, sizes, channels): where dense and the windowed implementations cross over; 8 heads,
# so d = C / 8.
CROSSOVER = ((3, (4, 6, 8, 10), (64, 256, 512)),
             (5, (6, 8, 10, 12), (64, 256, 512)),
             (7, (8, 10, 12, 14, 16), (64, 256, 512)))
CROSSOVER_IMPLEMENTATIONS = ("blocked", "shifted", "dense")


def bench_crossover(batch, *, repeats, heads=8, log=print):
  """Rows ``{kernel, size, channels, heads, default, <implementation>: s}``: op-level
  fwd+bwd of ``CROSSOVER_IMPLEMENTATIONS``, timed interleaved per shape."""
  rows = []
  for kernel, sizes, widths in CROSSOVER:
    for size in sizes:
      for channels in widths:
        res = bench_op_shape(batch, size, channels, heads, kernel, repeats=repeats,
                             max_mib=math.inf, only=CROSSOVER_IMPLEMENTATIONS,
                             log=lambda _: None)
        rows.append(dict(kernel=kernel, size=size, channels=channels, heads=heads,
                         default=_default_name(size, kernel, channels, heads),
                         **{n: res[n].time_s for n in CROSSOVER_IMPLEMENTATIONS}))
        log(f"  k={kernel} H=W={size} C={channels}: " + ", ".join(
            f"{n} {common.fmt_ms(rows[-1][n])} ms" for n in CROSSOVER_IMPLEMENTATIONS))
  return rows


def crossover_table(rows) -> str:
  """Per (k, H) and width: the fastest implementation, dense ÷ the faster windowed one
  (< 1: dense faster, bold), and the default (marked * where it is not the fastest)."""
  widths = sorted({r["channels"] for r in rows})
  heads = rows[0]["heads"]
  windowed = [n for n in CROSSOVER_IMPLEMENTATIONS if n != "dense"]
  header = ["k", "H=W", "HW / k²"] + [
      f"C={c} (d={c // heads}): default / fastest; dense ÷ {' or '.join(windowed)}"
      for c in widths]
  body = []
  for key in dict.fromkeys((r["kernel"], r["size"]) for r in rows):
    sel = {r["channels"]: r for r in rows if (r["kernel"], r["size"]) == key}
    k, size = key
    cells = []
    for c in widths:
      r = sel[c]
      fastest = min(CROSSOVER_IMPLEMENTATIONS, key=lambda n: r[n])
      ratio = r["dense"] / min(r[n] for n in windowed)
      miss = "" if r["default"] == fastest else "*"
      ratio_cell = f"**{ratio:.2f}**" if ratio < 1 else f"{ratio:.2f}"
      cells.append(f"{r['default']}{miss} / {fastest}; {ratio_cell}")
    body.append([k, size, f"{size * size / k**2:.1f}"] + cells)
  return common.markdown_table(header, body)


def bench_ablation(batch, size, channels, heads, kernel, *, repeats):
  """``{name: seconds}``: fwd+bwd of the default layer and of its parts, interleaved.

  Where a layer's time goes: the layer with and without relative logits, the default op
  (``default_implementation``) with and without them, ``blocked`` with them (the previous
  default, for scale), the q/k/v projections alone, and the 3x3 conv.
  """
  depth = channels // heads
  default = _default_name(size, kernel, channels, heads)
  keys = jax.random.split(jax.random.key(0), 6)
  shape = (batch, size, size, heads, depth)
  q, k, v, g = (jax.random.normal(keys[i], shape) for i in range(4))
  rel_h = jax.random.normal(keys[4], (kernel, depth // 2)) * depth**-0.5
  rel_w = jax.random.normal(keys[5], (kernel, depth // 2)) * depth**-0.5

  def op(implementation, relative):
    attend = functools.partial(ops.local_attention, kernel_size=kernel,
                               implementation=implementation)
    if relative:
      return (lambda q, k, v, rh, rw: attend(q, k, v, rel_h=rh, rel_w=rw),
              (q, k, v, rel_h, rel_w), g)
    return attend, (q, k, v), g

  cands = {
      f"op {default}, relative logits": op(default, True),
      f"op {default}, no positional term": op(default, False),
      "op blocked, relative logits": op("blocked", True),
  }
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
    cands[name] = (module.apply, (module.init(jax.random.key(0), x), x), cotangent)
  runs = {}
  for name, (f, args, cotangent) in cands.items():
    fn = lambda *a, f=f: jax.vjp(f, *a[:-1])[1](a[-1])
    compiled = jax.jit(fn).lower(*args, cotangent).compile()
    runs[name] = common.jax_runner(compiled, *args, cotangent)
  return common.time_interleaved(runs, repeats=repeats)


# ----------------------------------------------------------------------------- plot

def plot_vs_k(rows, path: str, use_torch: bool, size: int, channels: int) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  sel = sorted((r for r in rows if r["size"] == size and r["channels"] == channels),
               key=lambda r: r["kernel"])
  if not sel:
    return
  alts = list(ops.IMPLEMENTATIONS) + [CONV] + ([TORCH] if use_torch else [])
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, (attr, scale, label) in zip(axes, (("time_s", 1e3, "fwd+bwd time (ms)"),
                                             ("peak_bytes", 1 / common.MiB,
                                              "fwd+bwd peak memory (MiB)"))):
    for a in alts:
      pts = [(r["kernel"], getattr(r["results"]["fwd+bwd"][a], attr)) for r in sel]
      pts = [(k, v * scale) for k, v in pts if v]
      if pts:
        style = dict(linestyle="--") if a in (CONV, TORCH) else {}
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


# ----------------------------------------------------------------------------- main

def _default_name(size, kernel, channels, heads):
  return ops.default_implementation(size, size, kernel, jax.default_backend(), channels // heads)


def _serialize(rows):
  def conv(o):
    if isinstance(o, Result):
      return dataclasses.asdict(o)
    if isinstance(o, dict):
      return {k: conv(v) for k, v in o.items()}
    if isinstance(o, list):
      return [conv(v) for v in o]
    return o
  return conv(rows)


def _from_json(args) -> int:
  with open(args.from_json) as f:
    saved = json.load(f)
  rows = saved["rows"]
  for r in (r for r in rows if "results" in r):
    res = r["results"]
    if "fwd" in res or "fwd+bwd" in res:
      r["results"] = {m: {a: Result(**x) for a, x in v.items()} for m, v in res.items()}
    else:
      r["results"] = {a: Result(**x) for a, x in res.items()}
  print(f"Machine: {saved['machine']}\n")
  if "dense" in rows[0] and "results" not in rows[0]:
    print(crossover_table(rows))
    return 0
  if "group" in rows[0]:
    print(shapes_table(rows))
    return 0
  use_torch = TORCH in rows[0]["results"]["fwd+bwd"]
  print(layer_tables(rows, use_torch))
  if (args.full or args.vs_k) and args.plot:
    plot_vs_k(rows, args.plot, use_torch, 32, 64)
  return 0


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
  what.add_argument("--ablate", action="store_true",
                    help="where the default layer's fwd+bwd time goes (target shape)")
  what.add_argument("--crossover", action="store_true",
                    help="op-level fwd+bwd, blocked, shifted and dense around their crossover")
  what.add_argument("--shapes", action="store_true",
                    help="op-level fwd+bwd of every implementation at the models' shapes")
  parser.add_argument("--groups", nargs="+", default=None,
                      choices=sorted({group for group, *_ in MODEL_SHAPES}),
                      help="--shapes: only these groups of shapes (default: all)")
  parser.add_argument("--implementations", nargs="+", default=None,
                      choices=list(_op_variants()),
                      help="--shapes: only these variants (default: all)")
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
  parser.add_argument("--from-json", default=None,
                      help="print the tables (and --full's plot) of a saved --json run")
  args = parser.parse_args(argv)
  if args.from_json:
    return _from_json(args)

  torch = None if args.no_torch else common.try_import_torch()
  if torch is not None:
    torch.set_num_threads(common.machine_cores())
  use_torch = torch is not None
  repeats = args.repeats or (5 if (args.full or args.shapes) else
                             9 if (args.vs_k or args.crossover) else
                             11 if args.ablate else 15)
  print(f"Machine: {common.machine()}")
  print(f"Command: python -m benchmarks.layers {' '.join(sys.argv[1:] if argv is None else argv)}")
  started = time.time()

  print("\nCorrectness (max |Δ| vs reference, small input with borders):")
  print("  implementations:", {k: f"{v:.1e}" for k, v in check_implementations().items()})
  if use_torch:
    print("  torch unfold layer (weights copied):",
          {k: f"{v:.1e}" for k, v in check_torch_layer().items()})
  else:
    print("  torch is not installed: no PyTorch unfold layer in this run.")

  rows = []
  if args.ablate:
    size, channels, kernel = TARGET["size"], TARGET["channels"], TARGET["kernel"]
    times = bench_ablation(args.batch, size, channels, args.heads, kernel, repeats=repeats)
    print(f"\nfwd+bwd, batch {args.batch}, {size}×{size}, C={channels}, k={kernel}, "
          f"{args.heads} heads:\n")
    print(common.markdown_table(["part", "ms", "÷ conv 3×3"], [
        [n, common.fmt_ms(t), f"{t / times[CONV]:.1f}"] for n, t in times.items()]))
  elif args.crossover:
    print(f"\nOp-level fwd+bwd, {', '.join(CROSSOVER_IMPLEMENTATIONS)}, batch {args.batch}, "
          f"{args.heads} heads:")
    rows = bench_crossover(args.batch, repeats=repeats, heads=args.heads)
    print()
    print(crossover_table(rows))
  elif args.shapes:
    print(f"\nOp-level fwd+bwd at the models' shapes, batch {args.batch}:")
    for group, size, channels, heads, kernel in MODEL_SHAPES:
      if args.groups and group not in args.groups:
        continue
      res = bench_op_shape(args.batch, size, channels, heads, kernel, repeats=repeats,
                           max_mib=args.max_mib, only=args.implementations)
      rows.append(dict(group=group, batch=args.batch, size=size, channels=channels,
                       heads=heads, kernel=kernel,
                       default=_default_name(size, kernel, channels, heads),
                       default_block=blocked_ops.DEFAULT_BLOCK_SIZE, results=res))
    print()
    print(shapes_table(rows))
  else:
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
                       default=_default_name(size, kernel, channels, args.heads),
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
        tr = default / res[TORCH].time_s
        print(f"  default ÷ torch unfold = {tr:.3f} = 1/{1 / tr:.1f}  (target ≤ 1/4, stretch "
              f"≤ 1/10): {'met' if tr <= 0.25 else 'NOT met'}"
              f"{', stretch met' if tr <= 0.1 else ''}")
    if (args.full or args.vs_k) and args.plot:
      plot_vs_k(rows, args.plot, use_torch, 32, 64)
  print(f"\nTotal wall time {time.time() - started:.0f} s.")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(machine=common.machine(), rows=_serialize(rows)), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
