"""TPU without a TPU: the project's train step compiled for TPU devices that libtpu
describes (``jax.experimental.topologies``), the automatic choice made per target
platform at lowering, and the Mosaic kernels in it. (The kernels' numerics are tested in
Pallas's TPU interpret mode with the other implementations, tests/test_ops.py.)"""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import REPO, subprocess_env, tiny_config, xla_flags
from jax.experimental import pallas as pl
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from benchmarks import tpu as tpu_benchmark
from sasa_jax import data, ops
from sasa_jax.training import Experiment

# libtpu's wheels are for Linux on x86-64, where the test extra installs it (as in CI):
# there these tests never skip. Elsewhere they cannot run.
if platform.system() == "Linux" and platform.machine() == "x86_64":
  import libtpu  # noqa: F401  pylint: disable=unused-import
else:
  pytest.skip("libtpu (the test extra's TPU compiler) is built for Linux x86-64 only",
              allow_module_level=True)

# The v5e topology of the TPU benchmark: 4 chips, one TensorCore each.
TOPOLOGY = "v5e:2x2"
_DIGITS = data.DatasetInfo("digits", num_classes=10, num_train_examples=1437,
                           num_eval_examples=360, num_channels=1, image_size=(8, 8))


@pytest.fixture(scope="module")
def tpu_devices():
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  return topologies.get_topology_desc(topology_name=TOPOLOGY, platform="tpu").devices


def _train_step_hlo(devices, tmp_path, **model_overrides) -> str:
  """The compiled HLO of the loop's own train step of a tiny SASA model (BatchNorm,
  Nesterov SGD, EMA, bfloat16 compute), for ``devices``, batch-sharded over them."""
  config = tiny_config(compute_dtype="bfloat16", ema_decay=0.99, batch_size=8,
                       eval_batch_size=8, model_overrides=model_overrides)
  experiment = Experiment(config, str(tmp_path / "run"), info=_DIGITS, devices=devices)
  batch = {"image": jax.ShapeDtypeStruct((8, 8, 8, 1), jnp.uint8,
                                         sharding=experiment.data_sharding),
           "label": jax.ShapeDtypeStruct((8,), jnp.int32,
                                         sharding=experiment.data_sharding)}
  compiled = experiment.jitted_train_step().lower(experiment.abstract_state(),
                                                  batch).compile()
  assert compiled.cost_analysis()["flops"] > 0
  return compiled.as_text()


def test_the_train_step_compiles_for_tpu_with_the_mosaic_kernels(tpu_devices, tmp_path):
  """On the 4 devices of a v5e 2x2 slice, from this CPU host: the automatic choice is
  made for the target (TPU) when the step is lowered, so its attention layers run the
  Mosaic kernels (under shard_map, one per device), forward and backward."""
  hlo = _train_step_hlo(tpu_devices, tmp_path)
  kernels = re.findall(r'custom_call_target="tpu_custom_call"', hlo)
  # sasa_tiny: 2 attention layers (stage 2 attends at 8x8 and pools), 3 kernels each.
  assert len(kernels) == 6, len(kernels)
  # The same step lowered for this CPU has no TPU kernel: the host's choice.
  cpu = jax.jit(lambda q, k, v: ops.local_attention(q, k, v, kernel_size=5)).lower(
      *[jnp.zeros((1, 8, 8, 4, 4))] * 3).as_text()
  assert "tpu_custom_call" not in cpu


@pytest.mark.slow
def test_the_attention_stem_compiles_for_tpu_as_its_kernels(tpu_devices, tmp_path):
  """A tiny full-attention model (the attention stem over 2x2 blocks, pooled by them):
  its stem's block statistics run the two Mosaic kernels, forward and backward, beside
  the attention layers' six."""
  hlo = _train_step_hlo(tpu_devices, tmp_path, stem="attention", stem_block_size=2,
                        stem_pool=2)
  assert len(re.findall(r'custom_call_target="tpu_custom_call"', hlo)) == 6 + 2


@pytest.mark.slow
def test_an_option_the_kernels_lack_compiles_with_another_implementation(tpu_devices,
                                                                         tmp_path):
  """Shifted borders: never the Mosaic kernels (they exclude borders), on TPU too."""
  hlo = _train_step_hlo(tpu_devices, tmp_path, borders="shift")
  assert "tpu_custom_call" not in hlo


def test_implementations_that_cannot_run_on_a_platform_say_so():
  for implementation, backend in (("fused", "tpu"), ("tpu", "gpu")):
    with pytest.raises(ValueError) as error:
      ops.check_platform(implementation, backend)
    assert f"'{implementation}'" in str(error.value) and backend in str(error.value)
  ops.check_platform("tpu", "cpu")  # Interpreted: the tests.
  assert ops.default_implementation(56, 56, 7, "tpu", 8) == "tpu"
  assert ops.default_implementation(9, 9, (17, 17), "tpu", 8) == "dense"  # Global.
  assert ops.default_implementation(56, 56, 7, "tpu", 8, "shift") == "blocked"
  assert "fused" not in {ops.default_implementation(s, s, 7, "tpu", d)
                         for s in (7, 14, 28, 56) for d in (8, 16, 64)}


def _copy_kernel_hlo(device, cost_estimate) -> str:
  """The HLO of a Pallas TPU kernel copying an ``(8, 128)`` float32 array, compiled for
  ``device``, its cost estimate ``cost_estimate``."""
  def copy(x_ref, y_ref):
    y_ref[...] = x_ref[...]

  kernel = pl.pallas_call(copy, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
                          cost_estimate=cost_estimate)
  x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=NamedSharding(
      Mesh(np.array([device]), ("data",)), PartitionSpec()))
  return jax.jit(kernel).lower(x).compile().as_text()


@pytest.mark.parametrize("declared", [None, 0, 100, 10**9])
def test_the_benchmark_counts_a_kernel_at_no_less_than_its_operands_and_results(
    tpu_devices, declared):
  """XLA counts a custom call at what its kernel declares, or zero; the benchmark at
  least at the bytes of its operand and result (2 x 8 x 128 float32 here)."""
  estimate = None if declared is None else pl.CostEstimate(flops=0, transcendentals=0,
                                                           bytes_accessed=declared)
  hlo = _copy_kernel_hlo(tpu_devices[0], estimate)
  assert hlo.count('custom_call_target="tpu_custom_call"') == 1
  assert tpu_benchmark.custom_call_bytes(hlo) == (declared or 0, max(declared or 0,
                                                                     2 * 8 * 128 * 4))


_SEVERAL_DEVICES = textwrap.dedent("""
    import functools
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from sasa_jax import ops
    from sasa_jax.ops import stem

    mesh = Mesh(np.array(jax.devices()), ("data",))
    keys = jax.random.split(jax.random.key(0), 6)
    q, k, v = (jax.random.normal(key, (4, 9, 7, 2, 4)) for key in keys[:3])
    rel_h, rel_w = (jax.random.normal(key, (3, 2)) for key in keys[3:5])
    weights = jax.random.normal(keys[5], q.shape)

    def attend(implementation, q, k, v, rel_h, rel_w):
      return ops.local_attention(q, k, v, kernel_size=3, rel_h=rel_h, rel_w=rel_w,
                                 implementation=implementation)

    def output_and_grads(op, *args):
      out, vjp = jax.vjp(op, *args)
      return (out, *vjp(weights))

    want = output_and_grads(lambda *a: attend("reference", *a), q, k, v, rel_h, rel_w)
    sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v)]
    in_their_shard_map = jax.shard_map(
        lambda *a: attend("tpu", *a), mesh=mesh, in_specs=(P("data"),) * 3 + (P(), P()),
        out_specs=P("data"))
    errors = {}
    with jax.set_mesh(mesh):
      for name, op in (("mesh", lambda *a: attend("tpu", *a)),
                       ("shard_map", in_their_shard_map)):
        got = jax.jit(functools.partial(output_and_grads, op))(*sharded, rel_h, rel_w)
        errors[name] = [float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
                        for g, w in zip(got, want)]

    # The stem's block statistics: the batch's moments (every device's sums) and the
    # parameters' gradients (summed over the devices).
    x = jax.random.normal(keys[0], (4, 4, 6, 3))
    params = (jax.random.normal(keys[1], (3, 2, 3)),
              jax.nn.softmax(jax.random.normal(keys[2], (4, 2))),
              jax.random.normal(keys[3], (2 * 2 * 3, 8)))
    cotangents = [jax.random.normal(key, shape) for key, shape in
                  zip(keys[2:], [(4, 2, 3, 8)] * 2 + [(8,)] * 2)]

    def statistics(interpret, x, *params):
      stats = stem.block_statistics(x, *params, block=2, interpret=interpret)
      return sum(jnp.sum(s * c) for s, c in zip(stats, cotangents)), stats

    def stats_and_grads(interpret, *args):
      grads, stats = jax.grad(functools.partial(statistics, interpret), argnums=(0, 1, 2, 3),
                              has_aux=True)(*args)
      return (*stats, *grads)

    want = stats_and_grads(None, x, *params)  # On CPU: the XLA formulation.
    with jax.set_mesh(mesh):
      got = jax.jit(functools.partial(stats_and_grads, True))(
          jax.device_put(x, NamedSharding(mesh, P("data"))), *params)
    errors["stem"] = [float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
                      for g, w in zip(got, want)]
    print("RESULT " + json.dumps(errors))
""")


@pytest.mark.slow
def test_the_kernels_split_the_batch_over_several_devices():
  """On 4 devices (forced CPU ones, the kernels interpreted): under the run's mesh
  (``jax.set_mesh``, as the loop sets it) each device attends over its share, and inside
  a caller's ``shard_map`` over the shard it is given; the output and every gradient,
  the relative tables' summed over the devices, are the reference's. Likewise the
  attention stem's block statistics and their gradients."""
  result = subprocess.run([sys.executable, "-c", _SEVERAL_DEVICES], cwd=REPO,
                          capture_output=True, text=True, timeout=300,
                          env=subprocess_env(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(4)),
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  errors = json.loads(result.stdout.split("RESULT ")[-1])
  assert set(errors) == {"mesh", "shard_map", "stem"}
  for name, values in errors.items():
    assert len(values) == (8 if name == "stem" else 6) and max(values) < 1e-5, (name, values)
