"""The op at the models' shapes: forward + backward of every implementation, interleaved.

    python -m benchmarks.op_shapes                              # every group of shapes
    python -m benchmarks.op_shapes --groups "ImageNet 224" --implementations blocked \
        shifted dense fused --batch 32                          # on a GPU

For each spatial-layer shape of the registered models (a stride-2 SASA block attends at
its input resolution), ``ops.local_attention`` with each implementation: the gradients of
q, k, v, ``rel_h`` and ``rel_w`` for a fixed random output cotangent, timed with
``common.time_interleaved`` (compile excluded), and XLA's peak memory. The default
(``ops.default_implementation`` on this backend) is in bold, and ``default ÷ fastest``
says how far the automatic choice is from the best measured one.
"""

from __future__ import annotations

import argparse
import functools
import sys

from benchmarks import common
from sasa_jax import ops

# (group, H, C, heads, k): the spatial layers' shapes in the registered models.
MODEL_SHAPES = (
    [("ImageNet 224", h, c, 8, 7) for h, c in
     [(56, 64), (56, 128), (28, 128), (28, 256), (14, 256), (14, 512), (7, 512)]] +
    [("CIFAR 32", h, c, 8, 7) for h, c in
     [(32, 64), (32, 128), (16, 128), (16, 256), (8, 256), (8, 512), (4, 512)]] +
    [("ImageNet models at 64", h, c, 8, 7) for h, c in
     [(16, 64), (16, 128), (8, 128), (8, 256), (4, 256), (4, 512), (2, 512)]] +
    [("tiny digits 8", 8, 16, 4, 5), ("tiny digits 8", 8, 32, 4, 5)])


def bench_op_shape(batch, size, channels, heads, kernel, *, repeats, max_mib,
                   implementations=ops.IMPLEMENTATIONS, dense_max_ratio=16, log=print
                   ) -> dict[str, common.Result]:
  """``{implementation: Result}`` of the op's forward + backward at one shape."""
  args, cotangent = common.op_inputs(batch, size, channels, heads, kernel)
  runs, res = {}, {}
  for name in implementations:
    reason = common.skip_reason(name, batch, size, channels, kernel, heads, max_mib,
                                dense_max_ratio)
    if reason:
      res[name] = common.Result(skipped=reason)
      continue
    attend = functools.partial(ops.local_attention, kernel_size=kernel,
                               implementation=name)
    runs[name], peak = common.compiled_vjp(
        lambda q, k, v, rel_h, rel_w, attend=attend: attend(q, k, v, rel_h=rel_h,
                                                             rel_w=rel_w),
        args, cotangent)
    res[name] = common.Result(peak_bytes=peak)
  for name, t in common.time_interleaved(runs, repeats=repeats).items():
    res[name].time_s = t
  log(f"  B={batch} H=W={size} C={channels} N={heads} k={kernel}: " + ", ".join(
      f"{n} {common.fmt_ms(r.time_s)}" for n, r in res.items() if r.time_s))
  return res


def shapes_table(rows) -> str:
  """Markdown: the time of each implementation per shape, then the peak memory."""
  names = [n for n in ops.IMPLEMENTATIONS if any(n in r["results"] for r in rows)]
  header = (["models", "H=W", "C", "N", "k", "default"] + [f"{n} ms" for n in names] +
            ["fastest", "default ÷ fastest"])
  body = []
  for r in rows:
    res = r["results"]
    timed = {n: x.time_s for n, x in res.items() if x.time_s}
    fastest = min(timed, key=timed.get)
    default = timed.get(r["default"])
    cells = []
    for n in names:
      x = res.get(n, common.Result(skipped="not asked for"))
      if x.skipped:
        cells.append("skip")
      else:
        c = common.fmt_ms(x.time_s)
        cells.append(f"**{c}**" if n == r["default"] else c)
    body.append([r["group"], r["size"], r["channels"], r["heads"], r["kernel"], r["default"]] +
                cells + [fastest, common.fmt_ratio(default and default / timed[fastest])])
  mem_header = ["H=W", "C", "N", "k"] + [f"{n} MiB" for n in names]
  mem_body = [[r["size"], r["channels"], r["heads"], r["kernel"]] + [
      common.fmt_mib(r["results"][n].peak_bytes)
      if n in r["results"] and r["results"][n].time_s else "skip" for n in names]
              for r in rows]
  return (common.markdown_table(header, body) + "\n\nPeak memory (XLA memory analysis):\n\n" +
          common.markdown_table(mem_header, mem_body))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--groups", nargs="+", default=None,
                      choices=sorted({group for group, *_ in MODEL_SHAPES}),
                      help="only these groups of shapes (default: all)")
  parser.add_argument("--implementations", nargs="+", default=list(ops.IMPLEMENTATIONS),
                      choices=list(ops.IMPLEMENTATIONS),
                      help="only these implementations (default: all)")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5, help="timing rounds")
  parser.add_argument("--max-mib", type=float, default=256,
                      help="skip an implementation whose k²-fold window copy (or (HW)² "
                      "logits for dense) exceeds this many MiB")
  parser.add_argument("--json", default=None, help="also write the raw results here")
  args = parser.parse_args(argv)

  print(f"Machine: {common.machine()}")
  print(f"Command: python -m benchmarks.op_shapes "
        f"{' '.join(sys.argv[1:] if argv is None else argv)}")
  print(f"\nOp-level fwd+bwd at the models' shapes, batch {args.batch}:")
  rows = []
  for group, size, channels, heads, kernel in MODEL_SHAPES:
    if args.groups and group not in args.groups:
      continue
    res = bench_op_shape(args.batch, size, channels, heads, kernel, repeats=args.repeats,
                         max_mib=args.max_mib, implementations=args.implementations)
    rows.append(dict(group=group, batch=args.batch, size=size, channels=channels,
                     heads=heads, kernel=kernel,
                     default=common.default_implementation(size, kernel, channels, heads),
                     results=res))
  print()
  print(shapes_table(rows))
  if args.json:
    common.write_json(args.json, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
