"""What the training step costs on TPU, measured by the TPU compiler on this machine.

    python -m benchmarks.tpu                                   # v5e 2x2 and v5p 2x2x1
    python -m benchmarks.tpu --topologies v5e:2x2 --models resnet26 sasa_resnet26_conv_stem \
        --implementations auto blocked

libtpu (``pip install "jax[tpu]"``, or the test extra) describes TPU devices without a
TPU (``jax.experimental.topologies``), and XLA's TPU compiler compiles for them here. For
each topology and model, the loop's own training step (``Experiment.jitted_train_step``:
forward, backward, Nesterov SGD, BatchNorm in training mode, EMA, bfloat16 compute, as
``configs/imagenet.py`` trains it) is compiled for ``--batch-per-device`` 224² images
on every device of the topology, batch-sharded. Per device it prints:

* FLOPs and bytes accessed, from the compiled program's cost analysis. A custom call
  (the Pallas kernels) is counted at no less than the bytes of its operands plus its
  results: XLA counts it at the estimate the kernel declares, or zero (``bytes_accessed``);
* HBM: the arguments (train state and batch) and the temporaries, from the memory
  analysis;
* a roofline time, ``max(FLOPs / peak FLOP/s, bytes / HBM bandwidth)``, from the chip's
  published peaks (``PEAKS``) — the cost model's own ``optimal_seconds`` is negative on
  these programs, so it is not used;
* the compile time, and each SASA model's ratios to the ResNet of the same depth.

Nothing runs: there is no TPU here. Real step times need one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from benchmarks import common
from configs import imagenet
from sasa_jax import data, ops
from sasa_jax.training import Experiment


@dataclasses.dataclass(frozen=True)
class Peak:
  """A chip's published peaks: bfloat16 FLOP/s and HBM bytes/s, and where they are
  published."""

  flops: float
  bandwidth: float
  source: str


# Per chip: a device is a chip (v5e and v6e have one TensorCore per chip; v5p's two act
# as one device, megacore).
PEAKS = {
    "v5e": Peak(197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v6e": Peak(918e12, 1640e9, "https://cloud.google.com/tpu/docs/v6e"),
    "v5p": Peak(459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
}
# libtpu 0.0.42.1 describes v6e:2x2 too, but its compiler overflows a thread's stack on
# ResNet-26's step for it (SIGSEGV in its LLO scheduler, whatever `ulimit -s`).
TOPOLOGIES = ("v5e:2x2", "v5p:2x2x1")
MODELS = ("resnet26", "sasa_resnet26_conv_stem", "sasa_resnet26", "resnet50",
          "sasa_resnet50_conv_stem", "sasa_resnet50")
# ImageNet's description, without ImageNet: the step depends on its shapes only.
IMAGENET = data.DatasetInfo("imagenet2012", num_classes=1000, num_train_examples=1_281_167,
                            num_eval_examples=50_000, num_channels=3)

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_DECLARED = re.compile(r'"bytes_accessed"\s*:\s*"?(\d+)')


def shape_bytes(text: str) -> int:
  """The bytes of every array shape (``bf16[4,32]``) written in ``text``."""
  return sum(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _SHAPE.findall(text))


def custom_call_bytes(hlo: str) -> tuple[int, int]:
  """``(declared, counted)`` over the custom calls of an HLO module's text: the bytes
  their cost estimates declare (zero where none), and those the benchmark counts for them,
  each call at no less than its operands plus its results."""
  types = {}  # instruction name -> its result type (an operand is defined before use)
  declared = counted = 0
  for line in hlo.splitlines():
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    types[match[1]] = match[2].split(" custom-call(")[0].split("(%")[0]
    if " custom-call(" not in match[2]:
      continue
    result, rest = match[2].split(" custom-call(", 1)
    operands = re.findall(r"%([\w.\-]+)", rest.split(")", 1)[0])
    io = shape_bytes(result) + sum(shape_bytes(types.get(name, "")) for name in operands)
    stated = _DECLARED.search(rest)
    stated = int(stated[1]) if stated else 0
    declared += stated
    counted += max(stated, io)
  return declared, counted


@dataclasses.dataclass
class Cost:
  flops: float
  bytes: float
  arguments: int
  temporaries: int
  compile_s: float
  kernels: int

  def roofline_s(self, peak: Peak) -> float:
    return max(self.flops / peak.flops, self.bytes / peak.bandwidth)


def step_cost(model: str, implementation: str | None, devices, batch_per_device: int
              ) -> Cost:
  """The compiled training step of ``model`` on ``devices``, per device."""
  config = imagenet.get_config(model)
  config.batch_size = config.eval_batch_size = batch_per_device * len(devices)
  config.model_overrides.implementation = implementation
  with tempfile.TemporaryDirectory() as workdir:
    experiment = Experiment(config, workdir, info=IMAGENET, devices=devices)
  size = config.image_size
  batch = {"image": jax.ShapeDtypeStruct((config.batch_size, size, size, 3), jnp.uint8,
                                         sharding=experiment.data_sharding),
           "label": jax.ShapeDtypeStruct((config.batch_size,), jnp.int32,
                                         sharding=experiment.data_sharding)}
  start = time.perf_counter()
  compiled = experiment.jitted_train_step().lower(experiment.abstract_state(),
                                                  batch).compile()
  seconds = time.perf_counter() - start
  costs = compiled.cost_analysis()
  memory = compiled.memory_analysis()
  hlo = compiled.as_text()
  declared, counted = custom_call_bytes(hlo)
  return Cost(flops=costs["flops"], bytes=costs["bytes accessed"] - declared + counted,
              arguments=memory.argument_size_in_bytes,
              temporaries=memory.temp_size_in_bytes, compile_s=seconds,
              kernels=hlo.count('custom_call_target="tpu_custom_call"'))


def _baseline(model: str) -> str:
  """The ResNet of a SASA model's depth: ``sasa_resnet26_conv_stem -> resnet26``."""
  return "resnet" + re.search(r"\d+", model)[0]


def table(results: dict[tuple[str, str], Cost], peak: Peak) -> str:
  """One row per model and implementation; a SASA model's last three cells divide its
  bytes, temporaries and roofline time by those of the ResNet of its depth."""
  rows = []
  for (model, implementation), cost in results.items():
    base = results.get((_baseline(model), "auto"))
    measures = (cost.bytes, cost.temporaries, cost.roofline_s(peak))
    if base is None or base is cost:
      ratios = ["—"] * 3
    else:
      ratios = [f"{ours / theirs:.2f}×" for ours, theirs in
                zip(measures, (base.bytes, base.temporaries, base.roofline_s(peak)))]
    rows.append([
        model, implementation, f"{cost.flops / 1e9:.0f}", f"{cost.bytes / 1e9:.1f}",
        common.fmt_mib(cost.arguments), common.fmt_mib(cost.temporaries),
        f"{1e3 * cost.roofline_s(peak):.1f}", f"{cost.compile_s:.0f}", cost.kernels,
        *ratios])
  return common.markdown_table(
      ["model", "implementation", "GFLOPs", "GB accessed", "HBM arguments MiB",
       "HBM temporaries MiB", "roofline ms", "compile s", "Mosaic kernels",
       "bytes ÷ ResNet", "temporaries ÷ ResNet", "roofline ÷ ResNet"], rows)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES),
                      help="libtpu topology names, e.g. v5e:2x2 (chips per axis)")
  parser.add_argument("--models", nargs="+", default=list(MODELS), choices=imagenet.MODELS)
  parser.add_argument("--implementations", nargs="+", default=["auto"],
                      choices=["auto", *ops.IMPLEMENTATIONS],
                      help="'auto' (implementation=None: the choice for TPU) or names "
                      "of sasa_jax.ops.IMPLEMENTATIONS, for the SASA models")
  parser.add_argument("--batch-per-device", type=int, default=32)
  args = parser.parse_args(argv)
  for name in args.topologies:
    if name.split(":")[0] not in PEAKS:
      parser.error(f"--topologies {name}: the generation must be one of {sorted(PEAKS)} "
                   f"(the chips whose peaks the roofline uses), e.g. v5e:2x2")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  print(f"Machine (the compiler's host): {common.machine()}")
  print(f"Command: python -m benchmarks.tpu {' '.join(sys.argv[1:] if argv is None else argv)}")
  for name in args.topologies:
    generation = name.split(":")[0]
    peak = PEAKS[generation]
    devices = topologies.get_topology_desc(topology_name=name, platform="tpu").devices
    print(f"\n{name}: {len(devices)} × {devices[0].device_kind}; training step of "
          f"configs/imagenet.py, {args.batch_per_device} images of 224² per device, "
          f"bfloat16; per device. Peaks: {peak.flops / 1e12:g} TFLOP/s bf16, "
          f"{peak.bandwidth / 1e9:g} GB/s HBM ({peak.source}).\n", flush=True)
    results = {}
    for model in args.models:
      for implementation in (("auto",) if not model.startswith("sasa") else
                             args.implementations):
        cost = step_cost(model, None if implementation == "auto" else implementation,
                         devices, args.batch_per_device)
        results[model, implementation] = cost
        print(f"  {model} ({implementation}): {cost.bytes / 1e9:.1f} GB, temporaries "
              f"{common.fmt_mib(cost.temporaries)} MiB, compiled in {cost.compile_s:.0f} s",
              flush=True)
    print()
    print(table(results, peak))
  return 0


if __name__ == "__main__":
  sys.exit(main())
