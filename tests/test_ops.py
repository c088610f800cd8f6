"""The local-attention op: every implementation against the reference, the reference
against a brute-force dense softmax, known cases, transformations and argument errors."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from numerics import TOLERANCE, rel_error

from sasa_jax import ops
from sasa_jax.ops import _contract, blocked, shifted, stem
from sasa_jax.ops.local_attention import TPU_MAX_KERNEL_SIZE

FAST_IMPLEMENTATIONS = [name for name in ops.IMPLEMENTATIONS if name != "reference"]

# (B, H, W, N, d, kernel_size): odd, non-square images; windows from 1x1 to larger than
# the image; non-square windows.
SHAPES = [
    (2, 9, 7, 3, 4, 1),
    (2, 9, 7, 3, 4, 3),
    (1, 9, 7, 2, 6, 5),
    (2, 9, 7, 2, 4, 7),
    (1, 3, 2, 2, 4, 7),
    (1, 11, 5, 1, 8, (3, 5)),
]
# Each implementation against the reference: a window inside the image (batch 2, d = 6),
# one larger than it, a non-square one (k = 1 has its own test).
MATCH_SHAPES = [(2, 9, 7, 2, 6, 5), (1, 3, 2, 2, 4, 7), (1, 11, 5, 1, 8, (3, 5))]


def random_inputs(shape, relative, dtype=jnp.float32, seed=0):
  batch, height, width, heads, depth, kernel_size = shape
  kh, kw = ops.window_shape(kernel_size)
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  qkv = [jax.random.normal(k, (batch, height, width, heads, depth)).astype(dtype)
         for k in keys[:3]]
  tables = (jax.random.normal(keys[3], (kh, depth // 2)).astype(dtype),
            jax.random.normal(keys[4], (kw, depth // 2)).astype(dtype)) if relative else (
                None, None)
  return qkv, tables


def brute_force(q, k, v, kernel_size, rel_h=None, rel_w=None, scale=None):
  """Dense softmax over all H*W pixels with an explicit window mask, in float64 numpy."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  batch, height, width, heads, depth = q.shape
  kh, kw = ops.window_shape(kernel_size)
  scale = depth**-0.5 if scale is None else scale
  rows, cols = np.arange(height), np.arange(width)
  dy = rows[None, :] - rows[:, None]  # (i, a): a - i
  dx = cols[None, :] - cols[:, None]
  mask = (np.abs(dy)[:, None, :, None] <= kh // 2) & (np.abs(dx)[None, :, None, :] <= kw // 2)
  logits = np.einsum("zijnd,zabnd->zijnab", q, k)
  if rel_h is not None:
    rel_h, rel_w = np.asarray(rel_h, np.float64), np.asarray(rel_w, np.float64)
    half = depth // 2
    emb_h = rel_h[np.clip(dy + kh // 2, 0, kh - 1)]  # (i, a, d/2), clipped entries masked
    emb_w = rel_w[np.clip(dx + kw // 2, 0, kw - 1)]
    logits += np.einsum("zijnc,iac->zijna", q[..., :half], emb_h)[..., :, None]
    logits += np.einsum("zijnc,jbc->zijnb", q[..., half:], emb_w)[..., None, :]
  logits = np.where(mask[None, :, :, None], scale * logits, -np.inf)
  logits = logits.reshape(*logits.shape[:4], height * width)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("zijnk,zknd->zijnd", probs, v.reshape(batch, height * width, heads, depth))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("relative", [False, True])
def test_reference_matches_brute_force_dense_softmax(shape, relative):
  (q, k, v), (rel_h, rel_w) = random_inputs(shape, relative)
  got = ops.local_attention(q, k, v, kernel_size=shape[-1], rel_h=rel_h, rel_w=rel_w,
                            implementation="reference")
  assert rel_error(got, brute_force(q, k, v, shape[-1], rel_h, rel_w)) < 1e-6


def test_scale_one_is_the_papers_unscaled_equation():
  shape = (1, 5, 6, 2, 4, 3)
  (q, k, v), (rel_h, rel_w) = random_inputs(shape, True)
  got = ops.local_attention(q, k, v, kernel_size=3, rel_h=rel_h, rel_w=rel_w, scale=1.0)
  assert rel_error(got, brute_force(q, k, v, 3, rel_h, rel_w, scale=1.0)) < 1e-5
  default = ops.local_attention(q, k, v, kernel_size=3, rel_h=rel_h, rel_w=rel_w)
  assert rel_error(default, got) > 1e-2  # d**-0.5 really is applied by default


def test_padding_is_masked_not_zero_keys():
  """A border pixel must not give probability to zero-padded neighbours."""
  shape = (1, 4, 4, 1, 2, 3)
  (q, _, v), (rel_h, rel_w) = random_inputs(shape, True)
  k = jnp.zeros_like(q)  # all content logits 0: only the positional term differs
  probs = ops.attention_weights(q, k, kernel_size=3, rel_h=rel_h, rel_w=rel_w)
  corner = np.asarray(probs[0, 0, 0, 0])
  assert np.all(corner[0, :] == 0) and np.all(corner[:, 0] == 0)
  np.testing.assert_allclose(corner.sum(), 1.0, rtol=1e-6)
  out = ops.local_attention(q, k, v, kernel_size=3, rel_h=rel_h, rel_w=rel_w)
  window_values = v[0, 0:2, 0:2, 0]  # the corner's in-image neighbours (rows/cols 0..1)
  want = jnp.einsum("ab,abd->d", probs[0, 0, 0, 0, 1:, 1:], window_values)
  np.testing.assert_allclose(out[0, 0, 0, 0], want, rtol=1e-5)


@pytest.mark.parametrize("implementation", ops.IMPLEMENTATIONS)
def test_kernel_size_one_returns_value(implementation):
  (q, k, v), (rel_h, rel_w) = random_inputs((2, 9, 7, 3, 4, 1), True)
  out = ops.local_attention(q, k, v, kernel_size=1, rel_h=rel_h, rel_w=rel_w,
                            implementation=implementation)
  np.testing.assert_allclose(out, v, rtol=1e-6)


@pytest.mark.parametrize("implementation", ops.IMPLEMENTATIONS)
def test_full_window_is_global_attention(implementation):
  batch, height, width, heads, depth = 2, 5, 4, 2, 4
  (q, k, v), _ = random_inputs((batch, height, width, heads, depth, 1), False)
  out = ops.local_attention(q, k, v, kernel_size=(2 * height - 1, 2 * width - 1),
                            implementation=implementation)
  flat = lambda t: t.reshape(batch, height * width, heads, depth)
  logits = jnp.einsum("bind,bjnd->bnij", flat(q), flat(k)) * depth**-0.5
  want = jnp.einsum("bnij,bjnd->bind", jax.nn.softmax(logits, -1), flat(v))
  assert rel_error(out, want.reshape(out.shape)) < 1e-5


def _cotangent(shape, dtype):
  """The same random output cotangent for every run of a shape, rounded to ``dtype``."""
  return jax.random.normal(jax.random.PRNGKey(7), shape[:5]).astype(dtype)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _output_and_grads(implementation, shape, cotangent, q, k, v, rel_h=None, rel_w=None):
  """The op's output and the gradients of ``sum(output * cotangent)`` w.r.t. every input
  (one compiled program: far faster to test than op-by-op dispatch)."""
  tables = () if rel_h is None else (rel_h, rel_w)

  def op(q, k, v, *tables):
    return ops.local_attention(q, k, v, kernel_size=shape[-1], rel_h=tables[0] if tables else
                               None, rel_w=tables[1] if tables else None,
                               implementation=implementation)

  out, vjp = jax.vjp(op, q, k, v, *tables)
  return out, vjp(cotangent.astype(out.dtype))


@functools.lru_cache(maxsize=None)
def _reference_result(shape, relative, dtype):
  """Reference output and gradients in float32 on the (dtype-rounded) test inputs."""
  (q, k, v), tables = random_inputs(shape, relative, dtype)
  upcast = lambda t: None if t is None else t.astype(jnp.float32)
  return _output_and_grads("reference", shape, _cotangent(shape, dtype),
                           *map(upcast, (q, k, v, *tables)))


# The fast subset (-m "not slow") compares every implementation on a window inside the
# image in float32 and on the non-square one in bfloat16; the whole suite on every shape
# in both dtypes, and without relative tables (no table gradients).
MATCH_CASES = [
    (MATCH_SHAPES[0], True, jnp.float32), (MATCH_SHAPES[2], True, jnp.bfloat16),
    *(pytest.param(shape, True, dtype, marks=pytest.mark.slow) for shape, dtype in [
        (MATCH_SHAPES[0], jnp.bfloat16), (MATCH_SHAPES[1], jnp.float32),
        (MATCH_SHAPES[1], jnp.bfloat16), (MATCH_SHAPES[2], jnp.float32)]),
    pytest.param(MATCH_SHAPES[0], False, jnp.float32, marks=pytest.mark.slow)]


@pytest.mark.parametrize("implementation", FAST_IMPLEMENTATIONS)
@pytest.mark.parametrize("shape, relative, dtype", MATCH_CASES,
                         ids=lambda a: str(a) if isinstance(a, tuple) else None)
def test_implementation_matches_reference(implementation, shape, relative, dtype):
  """Forward and all gradients; bf16 runs are compared with the float32 reference on the
  same (bf16-rounded) inputs."""
  (q, k, v), tables = random_inputs(shape, relative, dtype)
  got_out, got = _output_and_grads(implementation, shape, _cotangent(shape, dtype), q, k, v,
                                   *tables)
  assert got_out.dtype == dtype
  want_out, want = _reference_result(shape, relative, dtype)
  tolerance = TOLERANCE[dtype]
  assert rel_error(got_out, want_out) < tolerance
  assert len(got) == len(want) == (5 if relative else 3)
  for got_grad, want_grad in zip(got, want):
    assert got_grad.dtype == dtype
    assert rel_error(got_grad, want_grad) < tolerance


@pytest.mark.parametrize("block_size", [1, 2, 4, 5, 16])
def test_blocked_any_block_size(block_size):
  """Blocks that don't divide H or W, blocks smaller than the radius, blocks over the image."""
  shape = (1, 9, 7, 2, 4, 5)
  (q, k, v), (rel_h, rel_w) = random_inputs(shape, True)
  got = blocked.blocked(q, k, v, window=_contract.as_window(5), rel_h=rel_h,
                        rel_w=rel_w, scale=4**-0.5, block_size=block_size)
  want = ops.local_attention(q, k, v, kernel_size=5, rel_h=rel_h, rel_w=rel_w,
                             implementation="reference")
  assert rel_error(got, want) < 1e-5


@pytest.mark.parametrize("implementation", ops.IMPLEMENTATIONS)
def test_vmap_and_jit(implementation):
  shape = (2, 6, 5, 2, 4, 3)
  (q, k, v), (rel_h, rel_w) = random_inputs(shape, True)
  op = functools.partial(ops.local_attention, kernel_size=3, implementation=implementation)
  stacked = jax.jit(jax.vmap(lambda q, k, v: op(q, k, v, rel_h=rel_h, rel_w=rel_w)))(
      q[None].repeat(3, 0), k[None].repeat(3, 0), v[None] * jnp.arange(1, 4)[:, None, None,
                                                                             None, None, None])
  for i in range(3):
    np.testing.assert_allclose(stacked[i], op(q, k, v * (i + 1), rel_h=rel_h, rel_w=rel_w),
                               rtol=1e-5, atol=1e-6)


def test_shifted_in_memory_is_the_identity():
  """The fusion guard of ``shifted`` adds an exact zero, whatever the values."""
  x = jnp.array([[1.5, -2.0, jnp.inf], [-jnp.inf, jnp.nan, -0.0]])
  np.testing.assert_array_equal(shifted._in_memory(x), x)
  np.testing.assert_array_equal(shifted._in_memory(-x[:1, :2]), -x[:1, :2])


def test_attention_weights_reproduce_the_output():
  shape = (1, 7, 6, 2, 4, 5)
  (q, k, v), (rel_h, rel_w) = random_inputs(shape, True)
  probs = ops.attention_weights(q, k, kernel_size=5, rel_h=rel_h, rel_w=rel_w)
  assert probs.shape == (1, 7, 6, 2, 5, 5)
  np.testing.assert_allclose(probs.sum((-1, -2)), 1.0, rtol=1e-5)
  padded = jnp.pad(v, ((0, 0), (2, 2), (2, 2), (0, 0), (0, 0)))
  out = sum(probs[..., a, b, None] * padded[:, a:a + 7, b:b + 6]
            for a, b in itertools.product(range(5), range(5)))
  np.testing.assert_allclose(out, ops.local_attention(q, k, v, kernel_size=5, rel_h=rel_h,
                                                      rel_w=rel_w), rtol=1e-4, atol=1e-5)


def test_default_implementation_is_valid_and_used():
  """The measured rule (benchmarks/README.md): dense up to 4 k^2 pixels (2 k^2 on CPU for
  heads of depth <= 8); above that shifted on CPU for depth <= 32, fused on GPU for
  depth <= 8, blocked otherwise; on TPU the Mosaic kernels for excluded borders and windows
  up to TPU_MAX_KERNEL_SIZE whatever the image; never an implementation that copies K and V
  k^2 times, never an interpret-mode kernel off its platform."""
  for height, width, kernel, want in [(56, 56, 7, "blocked"), (28, 28, 7, "blocked"),
                                      (14, 14, 7, "dense"), (7, 7, 7, "dense"),
                                      (3, 3, 11, "dense"), (224, 224, 3, "blocked"),
                                      (8, 8, 5, "dense"), (12, 12, 5, "blocked")]:
    assert ops.default_implementation(height, width, kernel) == want, (height, kernel)
  for backend, depth, want in [("cpu", 8, "shifted"), (None, 32, "shifted"),
                               ("cpu", 64, "blocked"), ("cpu", None, "blocked"),
                               ("gpu", 8, "fused"), ("gpu", 4, "fused"), ("gpu", 16, "blocked"),
                               ("gpu", None, "blocked"), ("tpu", 8, "tpu"), ("tpu", None, "tpu")]:
    assert ops.default_implementation(56, 56, 7, backend, depth) == want, (backend, depth)
  assert ops.default_implementation(14, 14, 7, "gpu", 8) == "dense"
  for height, kernel in [(14, 7), (7, 7), (224, 3)]:
    assert ops.default_implementation(height, height, kernel, "tpu", 8) == "tpu", (height, kernel)
  large = TPU_MAX_KERNEL_SIZE + 2
  assert ops.default_implementation(56, 56, large, "tpu", 8) == "blocked"
  assert ops.default_implementation(56, 56, 7, "tpu", 8, borders="shift") == "blocked"
  for backend in ("cpu", "gpu", None):
    assert ops.default_implementation(56, 56, 7, backend, 8) != "tpu"
  for height, width, kernel, depth, want in [(14, 14, 7, 8, "shifted"), (10, 10, 7, 8, "shifted"),
                                             (8, 8, 7, 8, "dense"), (14, 14, 7, 16, "dense"),
                                             (6, 6, 3, 4, "shifted"), (4, 4, 3, 4, "dense"),
                                             (5, 5, 9, 8, "dense")]:
    assert ops.default_implementation(height, width, kernel, "cpu", depth) == want, (
        height, kernel, depth)
  (q, k, v), (rel_h, rel_w) = random_inputs((1, 9, 7, 2, 4, 3), True)
  np.testing.assert_allclose(
      ops.local_attention(q, k, v, kernel_size=3, rel_h=rel_h, rel_w=rel_w),
      ops.local_attention(q, k, v, kernel_size=3, rel_h=rel_h, rel_w=rel_w,
                          implementation="reference"), rtol=1e-5, atol=1e-6)


def test_under_a_mesh_only_the_choice_for_its_platform_is_traced():
  """Without a mesh, the automatic choice (and the stem's block statistics) trace a
  branch per platform, the TPU kernels included, and keep the one the program is lowered
  for; under ``jax.set_mesh`` (as training traces its steps) only the branch for the
  mesh's devices is traced, with the same result."""
  (q, k, v), (rel_h, rel_w) = random_inputs((1, 16, 16, 2, 4, 5), True)  # cpu: shifted.
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 6, 3))
  form, mixture, values = jnp.ones((3, 2, 3)), jnp.full((4, 2), 0.5), jnp.ones((12, 8))

  def both(q, k, v, x):
    return (ops.local_attention(q, k, v, kernel_size=5, rel_h=rel_h, rel_w=rel_w),
            stem.block_statistics(x, form, mixture, values, block=2))

  everywhere = jax.make_jaxpr(both)(q, k, v, x)
  with jax.set_mesh(Mesh(np.array(jax.devices()[:1]), ("data",))):
    on_the_mesh = jax.make_jaxpr(both)(q, k, v, x)
    got = jax.jit(both)(q, k, v, x)
  assert str(everywhere).count("platform_index") == 2 and "pallas_call" in str(everywhere)
  assert "platform_index" not in str(on_the_mesh) and "pallas_call" not in str(on_the_mesh)
  for got_array, want in zip(jax.tree.leaves(got), jax.tree.leaves(jax.jit(both)(q, k, v, x))):
    np.testing.assert_array_equal(got_array, want)


def _call(**overrides):
  (q, k, v), (rel_h, rel_w) = random_inputs((1, 5, 4, 2, 4, 3), True)
  arguments = dict(query=q, key=k, value=v, kernel_size=3, rel_h=rel_h, rel_w=rel_w)
  arguments.update(overrides)
  query, key, value = arguments.pop("query"), arguments.pop("key"), arguments.pop("value")
  # Under jit: the error must come from tracing, before anything is compiled.
  return jax.jit(lambda q, k, v: ops.local_attention(q, k, v, **arguments))(query, key, value)


@pytest.mark.parametrize("overrides, message", [
    (dict(kernel_size=4), "kernel_size must be positive and odd"),
    (dict(kernel_size=0), "kernel_size must be positive and odd"),
    (dict(kernel_size=(3, 2)), "kernel_size must be positive and odd"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size must be a positive odd int or a pair"),
    (dict(kernel_size=3.0), "kernel_size must be a positive odd int or a pair"),
    (dict(query=jnp.zeros((5, 4, 2, 4))), "query must have rank 5"),
    (dict(value=jnp.zeros((1, 5, 4, 2, 2))), "must have the same shape"),
    (dict(key=jnp.zeros((1, 5, 4, 2, 4), jnp.bfloat16)), "must have the same dtype"),
    (dict(rel_w=None), "rel_h and rel_w must be given together"),
    (dict(rel_h=jnp.zeros((5, 2))), r"rel_h must have shape \(kh, d//2\) = \(3, 2\)"),
    (dict(rel_w=jnp.zeros((3, 4))), r"rel_w must have shape \(kw, d//2\) = \(3, 2\)"),
    (dict(scale=-1.0), "scale must be a positive finite number"),
    (dict(implementation="unfold"), r"implementation must be one of \['reference'"),
])
def test_bad_arguments_raise_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _call(**overrides)


# ---------------------------------------------------------------------------
# Dilation and shifted borders (neighbourhood attention).

# (B, H, W, N, d, kernel_size, dilation, borders): sizes that the dilation does not divide,
# non-square images and windows.
OPTION_CASES = [
    (1, 10, 9, 2, 4, 3, (2, 3), "exclude"),
    (2, 9, 7, 2, 4, (3, 5), 1, "shift"),
    (1, 11, 10, 1, 6, 3, 2, "shift"),
]


def option_inputs(case, relative, dtype=jnp.float32, seed=0):
  """``(q, k, v), (rel_h, rel_w)`` for ``case``, the tables sized for its border mode."""
  batch, height, width, heads, depth, kernel_size, _, borders = case
  rows_h, rows_w = ops.relative_table_rows(kernel_size, borders)
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  qkv = [jax.random.normal(k, (batch, height, width, heads, depth)).astype(dtype)
         for k in keys[:3]]
  tables = (jax.random.normal(keys[3], (rows_h, depth // 2)).astype(dtype),
            jax.random.normal(keys[4], (rows_w, depth // 2)).astype(dtype)) if relative else (
                None, None)
  return qkv, tables


def _axis_keys(i, size, kernel, dilation, borders):
  """The definition, for one query row: ``[(key row, relative table row), ...]``."""
  radius = kernel // 2
  if borders == "exclude":
    return [(i + dilation * (s - radius), s) for s in range(kernel)
            if 0 <= i + dilation * (s - radius) < size]
  group, position = i % dilation, i // dilation
  length = len(range(group, size, dilation))
  start = min(max(position - radius, 0), length - kernel)
  return [((start + s) * dilation + group, start + s - position + kernel - 1)
          for s in range(kernel)]


def pixel_by_pixel(q, k, v, kernel_size, dilation, borders, rel_h=None, rel_w=None):
  """The op's definition as a loop over every pixel and head, in float64 numpy: a second
  formula, independent of the implementations' index tables."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  batch, height, width, heads, depth = q.shape
  (kh, kw), (dh, dw) = ops.window_shape(kernel_size), _contract.as_dilation(dilation)
  out = np.zeros_like(q)
  for b, i, j, n in itertools.product(range(batch), range(height), range(width),
                                      range(heads)):
    keys = [(a, c, ra, rc) for a, ra in _axis_keys(i, height, kh, dh, borders)
            for c, rc in _axis_keys(j, width, kw, dw, borders)]
    query = q[b, i, j, n]
    logits = np.array([query @ k[b, a, c, n] + (0.0 if rel_h is None else
                                                query[:depth // 2] @ np.asarray(rel_h)[ra] +
                                                query[depth // 2:] @ np.asarray(rel_w)[rc])
                       for a, c, ra, rc in keys]) * depth**-0.5
    probs = np.exp(logits - logits.max())
    out[b, i, j, n] = (probs / probs.sum()) @ np.stack([v[b, a, c, n] for a, c, _, _ in keys])
  return out


@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
@pytest.mark.parametrize("relative", [False, True])
def test_reference_with_options_matches_the_definition_pixel_by_pixel(case, relative):
  (q, k, v), tables = option_inputs(case, relative)
  kernel_size, dilation, borders = case[5:]
  got = ops.local_attention(q, k, v, kernel_size=kernel_size, dilation=dilation,
                            borders=borders, rel_h=tables[0], rel_w=tables[1],
                            implementation="reference")
  assert rel_error(got, pixel_by_pixel(q, k, v, kernel_size, dilation, borders,
                                       *tables)) < 1e-6


def test_dilation_one_and_excluded_borders_are_todays_op():
  shape = (1, 9, 7, 2, 4, 5)
  (q, k, v), (rel_h, rel_w) = random_inputs(shape, True)
  want = brute_force(q, k, v, 5, rel_h, rel_w)
  for implementation in ops.IMPLEMENTATIONS:
    got = ops.local_attention(q, k, v, kernel_size=5, dilation=(1, 1), borders="exclude",
                              rel_h=rel_h, rel_w=rel_w, implementation=implementation)
    assert rel_error(got, want) < 1e-5, implementation


def _option_result(implementation, case, dtype):
  (q, k, v), tables = option_inputs(case, True, dtype)
  kernel_size, dilation, borders = case[5:]
  if implementation == "reference":  # In float32, on the dtype-rounded inputs.
    q, k, v, *tables = (t.astype(jnp.float32) for t in (q, k, v, *tables))

  @jax.jit
  def output_and_grads(q, k, v, rel_h, rel_w):
    op = functools.partial(ops.local_attention, kernel_size=kernel_size, dilation=dilation,
                           borders=borders, implementation=implementation)
    out, vjp = jax.vjp(lambda *a: op(*a[:3], rel_h=a[3], rel_w=a[4]), q, k, v, rel_h, rel_w)
    return out, vjp(_cotangent(case, dtype).astype(out.dtype))

  return output_and_grads(q, k, v, *tables)


@pytest.mark.parametrize("implementation, dtype", [  # The fast subset: the automatic choice.
    (None, jnp.float32),
    *(pytest.param(name, dtype, marks=pytest.mark.slow) for name, dtype in [
        *((name, jnp.float32) for name in FAST_IMPLEMENTATIONS),
        (None, jnp.bfloat16), ("blocked", jnp.bfloat16)])], ids=str)
@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
def test_implementations_with_options_match_reference(implementation, case, dtype):
  """Forward and all gradients (in bfloat16 too for the automatic choice and ``blocked``,
  whose shifted borders are new: the sub-grids and the rest of each implementation are
  covered in bfloat16 above), for every implementation that computes the border mode; the
  others refuse it, naming it."""
  borders = case[-1]
  if implementation is not None and borders not in ops.SUPPORTED_BORDERS[implementation]:
    with pytest.raises(ValueError, match=f"does not compute borders='{borders}'"):
      _option_result(implementation, case, dtype)
    return
  got_out, got = _option_result(implementation, case, dtype)
  want_out, want = _option_result("reference", case, dtype)
  assert got_out.dtype == dtype
  assert rel_error(got_out, want_out) < TOLERANCE[dtype]
  for got_grad, want_grad in zip(got, want, strict=True):
    assert rel_error(got_grad, want_grad) < TOLERANCE[dtype]


@pytest.mark.parametrize("case", OPTION_CASES, ids=str)
def test_attention_weights_with_options_place_every_key(case):
  """The weights, in the window centred on each query, reproduce the output."""
  (q, k, v), (rel_h, rel_w) = option_inputs(case, True)
  batch, height, width, heads, depth, kernel_size, dilation, borders = case
  probs = ops.attention_weights(q, k, kernel_size=kernel_size, dilation=dilation,
                                borders=borders, rel_h=rel_h, rel_w=rel_w)
  eh, ew = probs.shape[-2:]
  (kh, kw), (dh, dw) = ops.window_shape(kernel_size), _contract.as_dilation(dilation)
  reach = 2 if borders == "shift" else 1
  assert (eh, ew) == (reach * (kh - 1) * dh + 1, reach * (kw - 1) * dw + 1)
  np.testing.assert_allclose(probs.sum((-1, -2)), 1.0, rtol=1e-5)
  assert int((probs > 0).sum((-1, -2)).max()) <= kh * kw
  padded = jnp.pad(v, ((0, 0), (eh // 2, eh // 2), (ew // 2, ew // 2), (0, 0), (0, 0)))
  out = sum(probs[..., a, b, None] * padded[:, a:a + height, b:b + width]
            for a, b in itertools.product(range(eh), range(ew)))
  want = ops.local_attention(q, k, v, kernel_size=kernel_size, dilation=dilation,
                             borders=borders, rel_h=rel_h, rel_w=rel_w)
  np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-5)


def test_shifted_borders_see_exactly_the_window_everywhere():
  """Every query of a 7x7 map sees 9 keys at k = 3, the corner's window shifted inside."""
  q = jnp.zeros((1, 7, 7, 1, 2))
  probs = ops.attention_weights(q, q, kernel_size=3, borders="shift")  # (.., 5, 5)
  np.testing.assert_allclose(probs, np.where(probs > 0, 1 / 9, 0), atol=1e-7)
  assert ((probs > 0).sum((-1, -2)) == 9).all()
  # The corner's keys are rows and columns 0..2: offsets 0..2 from it.
  assert np.argwhere(np.asarray(probs[0, 0, 0, 0]) > 0).tolist() == [
      [a, b] for a in (2, 3, 4) for b in (2, 3, 4)]


@pytest.mark.parametrize("overrides, facts", [
    (dict(dilation=0), ("dilation", "int >= 1", "0")),
    (dict(dilation=(1, 2, 3)), ("dilation", "pair", "(1, 2, 3)")),
    (dict(borders="clamp"), ("borders", "'exclude'", "'shift'", "'clamp'")),
    (dict(borders="shift", kernel_size=5), ("borders='shift'", "width", "4")),
    (dict(borders="shift", dilation=(1, 2)), ("borders='shift'", "width", "3 * 2")),
    (dict(borders="shift", rel_h=jnp.zeros((3, 2))), ("rel_h", "2*kh-1", "(5, 2)")),
    (dict(borders="shift", implementation="shifted"), ("'shifted'", "borders='shift'",
                                                       "'blocked'")),
])
def test_bad_options_raise_clear_errors(overrides, facts):
  if overrides.get("borders") == "shift" and "rel_h" not in overrides:
    overrides.update(rel_h=jnp.zeros((5, 2)), rel_w=jnp.zeros((5, 2)))
  with pytest.raises(ValueError) as error:
    _call(**overrides)
  for fact in facts:
    assert fact in str(error.value), str(error.value)


def test_default_implementation_computes_the_border_mode():
  for height, backend, want in [(56, "cpu", "blocked"), (56, "gpu", "blocked"),
                                (14, "gpu", "dense"), (14, "cpu", "blocked"),
                                (9, "cpu", "dense"), (28, "tpu", "blocked")]:
    assert ops.default_implementation(height, height, 7, backend, 8, "shift") == want


def test_odd_head_depth_with_relative_tables_is_an_error():
  q = jnp.zeros((1, 5, 4, 2, 3))
  with pytest.raises(ValueError, match="d must be even; got d=3"):
    ops.local_attention(q, q, q, kernel_size=3, rel_h=jnp.zeros((3, 1)),
                        rel_w=jnp.zeros((3, 1)))
  # Without relative tables an odd depth is fine.
  assert ops.local_attention(q, q, q, kernel_size=3).shape == q.shape
