"""Where ``dense`` and the windowed implementations cross over, for the automatic choice.

    python -m benchmarks.crossover [--batch 8] [--heads 8]

``dense`` computes every query against every pixel (``H·W`` logits per query), the
windowed implementations ``k²`` (``shifted``) or ``(b + k - 1)²`` (``blocked``): ``dense``
wins while the image has a few ``k²`` pixels. For each ``k``, image size and width, the
op's forward + backward of ``blocked``, ``shifted`` and ``dense``, timed interleaved; the
table names the fastest, ``dense ÷`` the faster windowed one (bold below 1), and the
default (marked * where it is not the fastest): the data behind
``ops.default_implementation``'s ``DENSE_MAX_PIXELS_PER_WINDOW``.
"""

from __future__ import annotations

import argparse
import math
import sys

from benchmarks import common
from benchmarks.op_shapes import bench_op_shape

# (k, sizes, channels) around the crossover.
CROSSOVER = ((3, (4, 6, 8, 10), (64, 256, 512)),
             (5, (6, 8, 10, 12), (64, 256, 512)),
             (7, (8, 10, 12, 14, 16), (64, 256, 512)))
IMPLEMENTATIONS = ("blocked", "shifted", "dense")


def bench_crossover(batch, *, repeats, heads=8, log=print):
  """Rows ``{kernel, size, channels, heads, default, <implementation>: s}``."""
  rows = []
  for kernel, sizes, widths in CROSSOVER:
    for size in sizes:
      for channels in widths:
        res = bench_op_shape(batch, size, channels, heads, kernel, repeats=repeats,
                             max_mib=math.inf, implementations=IMPLEMENTATIONS,
                             log=lambda _: None)
        rows.append(dict(kernel=kernel, size=size, channels=channels, heads=heads,
                         default=common.default_implementation(size, kernel, channels,
                                                               heads),
                         **{n: res[n].time_s for n in IMPLEMENTATIONS}))
        log(f"  k={kernel} H=W={size} C={channels}: " + ", ".join(
            f"{n} {common.fmt_ms(rows[-1][n])} ms" for n in IMPLEMENTATIONS))
  return rows


def crossover_table(rows) -> str:
  """Per (k, H) and width: the fastest implementation, dense ÷ the faster windowed one
  (< 1: dense faster, bold), and the default (marked * where it is not the fastest)."""
  widths = sorted({r["channels"] for r in rows})
  heads = rows[0]["heads"]
  windowed = [n for n in IMPLEMENTATIONS if n != "dense"]
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
      fastest = min(IMPLEMENTATIONS, key=lambda n: r[n])
      ratio = r["dense"] / min(r[n] for n in windowed)
      miss = "" if r["default"] == fastest else "*"
      ratio_cell = f"**{ratio:.2f}**" if ratio < 1 else f"{ratio:.2f}"
      cells.append(f"{r['default']}{miss} / {fastest}; {ratio_cell}")
    body.append([k, size, f"{size * size / k**2:.1f}"] + cells)
  return common.markdown_table(header, body)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=9, help="timing rounds")
  parser.add_argument("--json", default=None, help="also write the raw results here")
  args = parser.parse_args(argv)
  print(f"Machine: {common.machine()}")
  print(f"\nOp-level fwd+bwd, {', '.join(IMPLEMENTATIONS)}, batch {args.batch}, "
        f"{args.heads} heads:")
  rows = bench_crossover(args.batch, repeats=args.repeats, heads=args.heads)
  print()
  print(crossover_table(rows))
  if args.json:
    common.write_json(args.json, rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
