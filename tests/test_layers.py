"""SASA layers: locality, equivariance, downsampling, ablation switches, the stem, errors."""

import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import TOLERANCE, rel_error

from sasa_jax import layers, ops


def init_apply(module, x, **kwargs):
  variables = module.init(jax.random.PRNGKey(1), x)
  return variables, module.apply(variables, x, **kwargs)


def images(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def input_sensitivity(module, variables, x, pixels):
  """``(P, H, W)`` bool: which input pixels the output at each ``(i, j)`` of ``pixels``
  depends on (their Jacobian, in one compiled program)."""
  rows, cols = (np.array(axis) for axis in zip(*pixels))
  outputs = lambda x: module.apply(variables, x)[0, rows, cols]  # (P, C_out)
  jacobian = jax.jit(jax.jacobian(outputs))(x)  # (P, C_out, B, H, W, C_in)
  return np.asarray(jnp.abs(jacobian).sum(axis=(1, 2, 5)) > 0)


@pytest.mark.parametrize("kernel_size", [3, (3, 5)])
def test_output_depends_only_on_its_window(kernel_size):
  kh, kw = ops.window_shape(kernel_size)
  x = images((1, 9, 8, 4))
  module = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=kernel_size)
  variables = module.init(jax.random.PRNGKey(1), x)
  pixels = [(4, 4), (0, 0), (8, 3)]
  for (i, j), got in zip(pixels, input_sensitivity(module, variables, x, pixels)):
    want = np.zeros((9, 8), bool)
    want[max(i - kh // 2, 0):i + kh // 2 + 1, max(j - kw // 2, 0):j + kw // 2 + 1] = True
    np.testing.assert_array_equal(got, want)


def test_global_attention_sees_the_whole_image():
  x = images((1, 6, 5, 4))
  module = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=None, max_size=8)
  variables = module.init(jax.random.PRNGKey(1), x)
  assert variables["params"]["rel_h"].shape == (15, 2)
  assert input_sensitivity(module, variables, x, [(0, 0)]).all()
  with pytest.raises(ValueError, match="max_size=8"):
    module.apply(variables, images((1, 9, 5, 4)))


@pytest.mark.parametrize("positional", ["relative", "none"])
def test_translation_equivariance_away_from_borders(positional):
  x = images((2, 13, 12, 4))
  module = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3,
                                     positional=positional)
  variables, out = init_apply(module, x)
  shifted = module.apply(variables, jnp.roll(x, (2, 1), axis=(1, 2)))
  # Pixels whose window is inside the image both before and after the shift.
  np.testing.assert_allclose(shifted[:, 3:-1, 2:-1], out[:, 1:-3, 1:-2], rtol=1e-5, atol=1e-6)


def test_absolute_positions_are_the_key_pixels_row_and_column_embeddings():
  """The paper's formula with absolute positions, by hand: pixel (i, j) attends to the
  (a, b) of its window inside the image with logit ``q_ij . (k_ab + [abs_h[a], abs_w[b]])
  / sqrt(d)``; so shifting the image changes the output (no translation equivariance)."""
  x = images((1, 5, 4, 6))
  module = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3,
                                     positional="absolute", max_size=7)
  variables, out = init_apply(module, x)
  params = jax.tree.map(np.asarray, variables["params"])
  assert {k: np.shape(v) for k, v in params.items() if k.startswith("abs")} == {
      "abs_h": (7, 2), "abs_w": (7, 2)}
  q, k, v = (np.einsum("bhwc,cnd->bhwnd", np.asarray(x), params[name]["kernel"])
             for name in ("query", "key", "value"))
  expected = np.zeros_like(q)
  for i, j, n in np.ndindex(5, 4, 2):
    window = [(a, b) for a in range(i - 1, i + 2) for b in range(j - 1, j + 2)
              if 0 <= a < 5 and 0 <= b < 4]
    logits = np.array([q[0, i, j, n] @ (k[0, a, b, n] + np.concatenate(
        [params["abs_h"][a], params["abs_w"][b]])) / 2.0 for a, b in window])
    p = np.exp(logits - logits.max())
    p /= p.sum()
    expected[0, i, j, n] = sum(pa * v[0, a, b, n] for pa, (a, b) in zip(p, window))
  np.testing.assert_allclose(out, expected.reshape(1, 5, 4, 8), rtol=1e-5, atol=1e-6)
  shifted = module.apply(variables, jnp.roll(x, (1, 1), axis=(1, 2)))
  assert rel_error(shifted[:, 2:-1, 2:-1], out[:, 1:-2, 1:-2]) > 1e-2


def test_stride_two_is_attention_then_average_pooling():
  x = images((2, 10, 8, 4))
  strided = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3, stride=2)
  variables, out = init_apply(strided, x)
  assert out.shape == (2, 5, 4, 8)
  full = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3).apply(variables, x)
  np.testing.assert_allclose(out, full.reshape(2, 5, 2, 4, 2, 8).mean((2, 4)), rtol=1e-5,
                             atol=1e-6)


def test_parameters_are_full_width_projections_and_shared_tables():
  module = layers.LocalSelfAttention(features=16, num_heads=4, kernel_size=(5, 3))
  variables, _ = init_apply(module, images((1, 6, 6, 12)))
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes == {
      "query": {"kernel": (12, 4, 4)}, "key": {"kernel": (12, 4, 4)},
      "value": {"kernel": (12, 4, 4)}, "rel_h": (5, 2), "rel_w": (3, 2)}


def test_content_false_drops_query_key_term():
  x = images((1, 7, 6, 4))
  module = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3)
  variables, _ = init_apply(module, x)
  no_content = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3, content=False)
  params = dict(variables["params"])
  zeroed_key = dict(params, key={"kernel": jnp.zeros_like(params["key"]["kernel"])})
  del params["key"]
  np.testing.assert_allclose(no_content.apply({"params": params}, x),
                             module.apply({"params": zeroed_key}, x), rtol=1e-6)
  assert "key" not in no_content.init(jax.random.PRNGKey(0), x)["params"]


def test_positional_none_has_no_tables_and_relative_tables_matter():
  x = images((1, 7, 6, 4))
  none = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3, positional="none")
  variables, out = init_apply(none, x)
  assert set(variables["params"]) == {"query", "key", "value"}
  relative = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3)
  rel_variables = relative.init(jax.random.PRNGKey(1), x)
  params = dict(rel_variables["params"], **variables["params"])
  zero_tables = dict(params, rel_h=jnp.zeros((3, 2)), rel_w=jnp.zeros((3, 2)))
  np.testing.assert_allclose(relative.apply({"params": zero_tables}, x), out, rtol=1e-6)
  assert not np.allclose(relative.apply({"params": params}, x), out, atol=1e-4)


def test_attention_weights_are_sown_for_visualisation():
  x = images((1, 7, 6, 4))
  module = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=5)
  variables, (out, state) = init_apply(module, x, mutable=["intermediates"])
  (weights,) = state["intermediates"]["attention_weights"]
  assert weights.shape == (1, 7, 6, 2, 5, 5)
  np.testing.assert_allclose(weights.sum((-1, -2)), 1.0, rtol=1e-5)
  assert np.all(weights[0, 0, 0, :, :2, :] == 0)  # rows above the image
  np.testing.assert_array_equal(out, module.apply(variables, x))


@pytest.mark.parametrize("implementation", ops.IMPLEMENTATIONS)
def test_layer_implementations_agree(implementation):
  x = images((2, 9, 7, 8))
  make = functools.partial(layers.LocalSelfAttention, features=8, num_heads=2, kernel_size=5)
  variables, want = init_apply(make(implementation="reference"), x)
  got = make(implementation=implementation).apply(variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dilation, borders", [(2, "exclude"), (1, "shift"), ((2, 1), "shift")])
def test_window_options_size_the_tables_and_reach_the_right_pixels(dilation, borders):
  """The relative tables have kh rows (2 kh - 1 with shifted borders), and the output at a
  pixel depends on exactly the pixels of its window as the op defines it."""
  x = images((1, 8, 7, 4))
  module = layers.LocalSelfAttention(features=4, num_heads=1, kernel_size=3,
                                     dilation=dilation, borders=borders)
  variables, out = init_apply(module, x)
  rows = 5 if borders == "shift" else 3
  assert variables["params"]["rel_h"].shape == variables["params"]["rel_w"].shape == (rows, 2)
  weights = ops.attention_weights(*(jnp.ones((1, 8, 7, 1, 4)),) * 2, kernel_size=3,
                                  dilation=dilation, borders=borders)
  pixels = [(0, 0), (4, 3), (7, 6)]
  for (i, j), got in zip(pixels, input_sensitivity(module, variables, x, pixels)):
    eh, ew = weights.shape[-2:]
    window = np.zeros((8 + eh, 7 + ew), bool)
    window[i:i + eh, j:j + ew] = np.asarray(weights[0, i, j, 0]) > 0
    np.testing.assert_array_equal(got, window[eh // 2:eh // 2 + 8, ew // 2:ew // 2 + 7])


def test_bfloat16_compute_with_float32_params():
  x = images((2, 8, 8, 8))
  module = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3)
  variables, want = init_apply(module, x)
  got = layers.LocalSelfAttention(features=8, num_heads=2, kernel_size=3,
                                  dtype=jnp.bfloat16).apply(variables, x)
  assert got.dtype == jnp.bfloat16
  assert jax.tree.leaves(variables)[0].dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=5e-2, atol=5e-2)


def test_attention_stem_shapes_parameters_and_blocks():
  x = images((2, 8, 12, 3))
  stem = layers.AttentionStem(features=16, num_heads=4, block_size=4, num_mixtures=3)
  variables, out = init_apply(stem, x)
  assert out.shape == (2, 8, 12, 16)
  shapes = jax.tree.map(jnp.shape, variables["params"])
  assert shapes["value"] == (3, 3, 16)
  assert shapes["query"] == shapes["key"] == {"kernel": (3, 4, 4)}
  # Each pixel attends within its own 4x4 block, nowhere else.
  (sensitivity,) = input_sensitivity(stem, variables, x, [(5, 6)])
  want = np.zeros((8, 12), bool)
  want[4:8, 4:8] = True
  np.testing.assert_array_equal(sensitivity, want)


def stem_reference(params, x, num_heads, block_size):
  """The stem as the paper writes it, in float32: per-pixel q, k and spatially-aware v
  (``v_ab = sum_m p(a, b, m) W_V^m x_ab``), softmax(q . k / sqrt(d)) within each block."""
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  x = x.astype(jnp.float32)
  height, width = x.shape[1:3]
  blocks = dict(p=block_size, q=block_size)

  def project(name):
    out = jnp.einsum("bhwc,cnd->bhwnd", x, params[name]["kernel"])
    return out + params[name].get("bias", 0.)

  position = params["emb_row"][:, None] + params["emb_col"][None]
  mixture = jax.nn.softmax(position @ params["mixture_embedding"].T, axis=-1)  # p(a, b, m)
  tiled = jnp.tile(mixture, (height // block_size, width // block_size, 1))
  value = jnp.einsum("hwm,mcf,bhwc->bhwf", tiled, params["value"], x)
  value = einops.rearrange(value, "b h w (n d) -> b h w n d", n=num_heads)
  q, k, v = (einops.rearrange(t, "b (x p) (y q) n d -> b x y n (p q) d", **blocks)
             for t in (project("query"), project("key"), value))
  logits = jnp.einsum("bxynid,bxynjd->bxynij", q, k) / np.sqrt(q.shape[-1])
  out = jnp.einsum("bxynij,bxynjd->bxynid", jax.nn.softmax(logits, axis=-1), v)
  return einops.rearrange(out, "b x y n (p q) d -> b (x p) (y q) (n d)", **blocks)


# Each shape and each dtype with and without biases.
@pytest.mark.parametrize("shape, block_size, dtype, use_bias", [
    ((2, 6, 10, 5), 2, jnp.float32, True), ((2, 6, 10, 5), 2, jnp.bfloat16, False),
    ((1, 8, 12, 3), 4, jnp.float32, False), ((1, 8, 12, 3), 4, jnp.bfloat16, True)],
                         ids=["2x2-f32-bias", "2x2-bf16", "4x4-f32", "4x4-bf16-bias"])
def test_attention_stem_matches_the_papers_formula(shape, block_size, dtype, use_bias):
  """Output and the gradients of every parameter and of the input; bf16 runs against the
  float32 formula on the same bf16-rounded input and parameters."""
  stem = layers.AttentionStem(features=12, num_heads=3, block_size=block_size,
                              num_mixtures=3, use_bias=use_bias, dtype=dtype)
  x = images(shape).astype(dtype)
  params = stem.init(jax.random.PRNGKey(1), x)["params"]
  # Non-zero biases, and parameters exactly representable in the compute dtype.
  params = jax.tree.map(
      lambda a: (a + 0.3 * jax.random.normal(jax.random.PRNGKey(2), a.shape)).astype(
          dtype).astype(jnp.float32), params)
  cotangent = images(shape[:3] + (12,), seed=3)

  def loss(fn, params, x):
    return jnp.sum(fn(params, x).astype(jnp.float32) * cotangent)

  ours = lambda params, x: stem.apply({"params": params}, x)
  formula = lambda params, x: stem_reference(params, x, 3, block_size)
  got_out = jax.jit(ours)(params, x)
  assert got_out.dtype == dtype
  assert rel_error(got_out, jax.jit(formula)(params, x)) < TOLERANCE[dtype]
  got = jax.jit(jax.grad(functools.partial(loss, ours), argnums=(0, 1)))(params, x)
  want = jax.jit(jax.grad(functools.partial(loss, formula), argnums=(0, 1)))(params, x)
  if use_bias:  # A key bias adds q . b_k to a whole row of logits: the softmax ignores it.
    for grads in (got, want):
      np.testing.assert_allclose(grads[0]["key"].pop("bias"), 0, atol=1e-3)
  for got_grad, want_grad in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert rel_error(got_grad, want_grad) < TOLERANCE[dtype]


def test_attention_stem_values_are_spatially_aware():
  """The same pixel content gets different values at different positions in its block."""
  stem = layers.AttentionStem(features=8, num_heads=2, block_size=4)
  constant = jnp.ones((1, 4, 4, 3))
  variables, out = init_apply(stem, constant)
  # Constant input: every key equal, attention uniform, output = mean of the values, which
  # differ by position only through the mixture p(a, b, m).
  params = variables["params"]
  position = params["emb_row"][:, None, :] + params["emb_col"][None, :, :]
  mixture = jax.nn.softmax(position @ params["mixture_embedding"].T, axis=-1)  # p(a, b, m)
  kernels = params["value"]
  np.testing.assert_allclose(mixture.sum(-1), 1.0, rtol=1e-6)
  values = jnp.einsum("abm,mcf,c->abf", mixture, kernels, jnp.ones(3))
  np.testing.assert_allclose(out[0], jnp.broadcast_to(values.mean((0, 1)), (4, 4, 8)),
                             rtol=1e-5, atol=1e-6)
  assert values.std(axis=(0, 1)).min() > 0


@pytest.mark.parametrize("make, message", [
    (lambda: layers.LocalSelfAttention(16, kernel_size=4), "kernel_size must be positive and odd"),
    (lambda: layers.LocalSelfAttention(16, kernel_size=-3), "kernel_size must be positive and"),
    (lambda: layers.LocalSelfAttention(16, num_heads=3), "features must be divisible by num_heads"),
    (lambda: layers.LocalSelfAttention(12, num_heads=4), "d must be even; got d=3"),
    (lambda: layers.LocalSelfAttention(16, positional="sinusoid"), "positional must be one of"),
    (lambda: layers.LocalSelfAttention(16, implementation="unfold"), "implementation must be one"),
    (lambda: layers.LocalSelfAttention(16, stride=0), "stride must be a positive int"),
    (lambda: layers.LocalSelfAttention(16, dilation=0), "dilation must be an int >= 1"),
    (lambda: layers.LocalSelfAttention(16, borders="wrap"), "borders must be one of"),
    (lambda: layers.LocalSelfAttention(16, borders="shift", implementation="fused"),
     "does not compute borders='shift'"),
    (lambda: layers.LocalSelfAttention(16, kernel_size=None, dilation=2),
     "global attention. takes the default dilation=1"),
    (lambda: layers.AttentionStem(features=10, num_heads=4), "features must be divisible"),
    (lambda: layers.AttentionStem(block_size=0), "block_size must be a positive int"),
])
def test_bad_configuration_raises_clear_errors(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_odd_head_depth_is_fine_without_positions():
  module = layers.LocalSelfAttention(12, num_heads=4, positional="none", kernel_size=3)
  assert init_apply(module, images((1, 5, 5, 4)))[1].shape == (1, 5, 5, 12)


@pytest.mark.parametrize("module, shape, message", [
    (layers.LocalSelfAttention(8, num_heads=2), (5, 5, 4), "rank 4, shape \\(B, H, W, C\\)"),
    (layers.AttentionStem(features=8, num_heads=2), (1, 6, 8, 3), "multiples of block_size=4"),
])
def test_bad_inputs_raise_before_compilation(module, shape, message):
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(shape))
