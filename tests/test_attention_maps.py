"""attention_maps: collecting SASA attention weights from layers and models, and placing
a pixel's window on the image grid."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sasa_jax import attention_maps, layers, models


def images(shape, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


@functools.lru_cache
def layer_and_weights(shape=(2, 9, 7, 4), kernel_size=(3, 5), features=8, num_heads=2):
  x = images(shape)
  layer = layers.LocalSelfAttention(features=features, num_heads=num_heads,
                                    kernel_size=kernel_size)
  variables = layer.init(jax.random.PRNGKey(1), x)
  return layer, variables, x, attention_maps.collect(layer, variables, x)


def window_mask(height, width, i, j, kh, kw):
  """``(H, W)`` bool: the in-image part of pixel (i, j)'s window, by brute force."""
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return (np.abs(rows - i) <= kh // 2) & (np.abs(cols - j) <= kw // 2)


ALL_PIXELS = [(i, j) for i in range(9) for j in range(7)]


def test_collect_from_a_layer():
  layer, variables, x, maps = layer_and_weights()
  assert list(maps) == [""]  # The module itself.
  assert maps[""].shape == (2, 9, 7, 2, 3, 5)
  output, with_maps = attention_maps.apply_with_attention(layer, variables, x)
  np.testing.assert_array_equal(output, layer.apply(variables, x))
  np.testing.assert_array_equal(with_maps[""], maps[""])


@pytest.mark.parametrize("i,j", ALL_PIXELS)
def test_pixel_maps_are_distributions_over_exactly_the_window(i, j):
  _, _, _, maps = layer_and_weights()
  heat = np.asarray(attention_maps.pixel_map(maps[""], i, j))  # (B, H, W, N)
  assert heat.shape == (2, 9, 7, 2)
  np.testing.assert_allclose(heat.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  inside = window_mask(9, 7, i, j, 3, 5)
  assert np.all(heat[:, ~inside] == 0)  # Zero outside the window and the image,
  assert np.all(heat[:, inside] > 0)  # positive (a softmax) on all of the rest.


@pytest.mark.parametrize("i,j", [(0, 0), (0, 6), (8, 0), (8, 6), (4, 3), (1, 5)])
def test_pixel_map_places_window_entries_at_their_pixels(i, j):
  _, _, _, maps = layer_and_weights()
  weights = np.asarray(maps[""])
  heat = np.asarray(attention_maps.pixel_map(weights, i, j))
  want = np.zeros_like(heat)
  for r in range(3):
    for c in range(5):
      a, b = i + r - 1, j + c - 2
      if 0 <= a < 9 and 0 <= b < 7:
        want[:, a, b, :] = weights[:, i, j, :, r, c]
  np.testing.assert_array_equal(heat, want)


def test_pixel_map_of_a_one_hot_window_at_the_border():
  # A synthetic (H, W, N, kh, kw) = (4, 5, 1, 3, 3) grid whose every window puts all its
  # mass on the offset (+1, -1): row below, column to the left.
  weights = np.zeros((4, 5, 1, 3, 3), np.float32)
  weights[..., 2, 0] = 1.0
  heat = np.asarray(attention_maps.pixel_map(weights, 0, 4))
  assert heat.shape == (4, 5, 1)
  assert heat[1, 3, 0] == 1.0 and heat.sum() == 1.0
  # Negative indices count from the end, as in numpy.
  np.testing.assert_array_equal(attention_maps.pixel_map(weights, -4, -1), heat)
  # At the bottom-left corner that neighbour is outside the image: nothing is placed.
  assert np.asarray(attention_maps.pixel_map(weights, 3, 0)).sum() == 0.0


def test_pixel_map_reproduces_the_layer_output():
  """``out[i, j, n] = sum_ab map[a, b, n] v[a, b, n]``: the maps are what the layer uses."""
  layer, variables, x, maps = layer_and_weights()
  out = layer.apply(variables, x).reshape(2, 9, 7, 2, 4)  # (B, H, W, N, d)
  value = jnp.einsum("bhwc,cnd->bhwnd", x, variables["params"]["value"]["kernel"])
  for i, j in [(0, 0), (4, 3), (8, 6), (2, 6)]:
    heat = attention_maps.pixel_map(maps[""], i, j)  # (B, H, W, N)
    np.testing.assert_allclose(jnp.einsum("bhwn,bhwnd->bnd", heat, value),
                               out[:, i, j], rtol=1e-5, atol=1e-5)


def stem_and_maps(shape=(2, 6, 9, 3), block_size=3):
  stem = layers.AttentionStem(features=8, num_heads=2, block_size=block_size,
                              num_mixtures=2)
  x = images(shape)
  variables = stem.init(jax.random.PRNGKey(1), x)
  return stem, variables, x, attention_maps.collect(stem, variables, x)


@pytest.mark.parametrize("i,j", [(0, 0), (4, 5), (5, 8), (2, 3), (3, 2)])
def test_stem_maps_are_distributions_over_the_pixels_block(i, j):
  _, _, _, maps = stem_and_maps()
  assert list(maps) == [""] and maps[""].shape == (2, 6, 9, 2, 5, 5)
  heat = np.asarray(attention_maps.pixel_map(maps[""], i, j))  # (B, H, W, N)
  np.testing.assert_allclose(heat.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  rows, cols = np.meshgrid(np.arange(6), np.arange(9), indexing="ij")
  block = (rows // 3 == i // 3) & (cols // 3 == j // 3)
  assert np.all(heat[:, ~block] == 0) and np.all(heat[:, block] > 0)


def test_stem_maps_reproduce_the_stem_output():
  """``out[i, j, n] = sum_ab map[a, b, n] v[a, b, n]`` with the paper's spatially-aware
  values ``v_ab = sum_m p(a mod b, b mod b, m) W_V^m x_ab``: the maps are what the stem
  uses."""
  stem, variables, x, maps = stem_and_maps()
  params = variables["params"]
  position = params["emb_row"][:, None] + params["emb_col"][None]
  mixture = jax.nn.softmax(position @ params["mixture_embedding"].T, axis=-1)  # (3, 3, m)
  value = jnp.einsum("hwm,mcf,bhwc->bhwf", jnp.tile(mixture, (2, 3, 1)), params["value"], x)
  value = value.reshape(2, 6, 9, 2, 4)  # (B, H, W, N, d)
  out = stem.apply(variables, x).reshape(2, 6, 9, 2, 4)
  for i, j in [(0, 0), (4, 5), (5, 8), (1, 7)]:
    heat = attention_maps.pixel_map(maps[""], i, j)
    np.testing.assert_allclose(jnp.einsum("bhwn,bhwnd->bnd", heat, value), out[:, i, j],
                               rtol=1e-5, atol=1e-5)


def attention_layer_paths(model, variables, x):
  """Paths of every attention layer call, found independently of the sown weights:
  Flax's capture_intermediates records the outputs of the modules the filter accepts."""
  _, state = jax.eval_shape(functools.partial(
      model.apply, train=False,
      capture_intermediates=lambda mdl, _: isinstance(
          mdl, (layers.LocalSelfAttention, layers.AttentionStem)),
      mutable=["intermediates"]), variables, x)
  paths = {}

  def walk(tree, prefix):
    for name, value in tree.items():
      if name == "__call__":
        paths["/".join(prefix)] = value[0].shape
      elif isinstance(value, dict):
        walk(value, prefix + (name,))

  walk(state.get("intermediates", {}), ())
  return paths


@pytest.mark.parametrize("name,overrides,num_layers", [
    ("sasa_tiny", {}, 2),
    # The attention stem (2 heads, 4x4 blocks), two stages of two blocks: 1 + 4 layers.
    ("sasa_resnet26_cifar", dict(stage_sizes=(2, 2), width=4, num_heads=2, kernel_size=3,
                                 stem_heads=2), 5),
    ("sasa_tiny", dict(spatial=("conv", "attention")), 1),
    ("resnet_tiny", {}, 0),
])
def test_model_collection_finds_every_attention_layer(name, overrides, num_layers):
  model = models.create(name, **overrides)
  config = models.get_config(name)
  x = images((2, 8, 8, config.in_channels))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), x)
  logits, maps = jax.jit(functools.partial(attention_maps.apply_with_attention, model,
                                           train=False))(variables, x)
  np.testing.assert_array_equal(logits, jax.jit(functools.partial(model.apply, train=False))(
      variables, x))
  paths = attention_layer_paths(model, variables, x)
  assert list(maps) == list(paths) and len(maps) == num_layers
  for path, weights in maps.items():
    layer_out = paths[path]  # (B, H / stride, W / stride, F)
    batch, height, width, heads, kh, kw = weights.shape
    if path == "stem_attention":  # Block attention in a window that holds any block.
      window = 2 * model.stem_block_size - 1
      assert (batch, heads, kh, kw) == (2, model.stem_heads, window, window)
    else:
      assert (batch, heads, kh, kw) == (2, model.num_heads, model.kernel_size,
                                        model.kernel_size)
    # A strided layer (the first block of stages 2+) attends at its input resolution,
    # then pools.
    stride = 2 if path.endswith("block1/attention") and not path.startswith("stage1") else 1
    assert (height // stride, width // stride) == layer_out[1:3]
    np.testing.assert_allclose(weights.sum((-1, -2)), 1.0, rtol=1e-5)
  if name == "sasa_tiny" and not overrides:  # Stage 2 pools 8x8 -> 4x4 after attending.
    assert maps["stage2_block1/attention"].shape == (2, 8, 8, 4, 5, 5)


def test_collect_under_jit_with_stale_intermediates_and_mutable():
  model = models.create("sasa_tiny", width=8)
  x = images((2, 8, 8, 1))
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  want = attention_maps.collect(model, variables, x, train=False)  # Eager.
  # Variables that already hold sown weights (e.g. from init(mutable=True)) add no stale
  # entries, and jit works.
  stale = model.init(jax.random.PRNGKey(0), x, train=False, mutable=True)
  assert "intermediates" in stale
  got = jax.jit(lambda v, x: attention_maps.collect(model, v, x, train=False))(stale, x)
  assert list(got) == list(want)
  for path in want:
    np.testing.assert_allclose(got[path], want[path], rtol=1e-5, atol=1e-6)
  # A caller's `mutable` is kept (train=True needs batch_stats mutable).
  logits, train_maps = attention_maps.apply_with_attention(
      model, variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (2, 10) and list(train_maps) == list(want)


def test_a_layer_called_twice_has_one_entry_per_call():

  class Twice(nn.Module):

    @nn.compact
    def __call__(self, x):
      layer = layers.LocalSelfAttention(features=4, num_heads=2, kernel_size=3,
                                        name="shared")
      return layer(layer(x))

  x = images((1, 5, 5, 4))
  model = Twice()
  variables = model.init(jax.random.PRNGKey(0), x)
  maps = attention_maps.collect(model, variables, x)
  assert list(maps) == ["shared#0", "shared#1"]
  assert not np.allclose(maps["shared#0"], maps["shared#1"])


def test_upsample_and_feature_pixel_line_up():
  grid = jnp.arange(2 * 3 * 4 * 2, dtype=jnp.float32).reshape(2, 3, 4, 2)  # (B, h, w, N)
  up = np.asarray(attention_maps.upsample(grid, (12, 16)))
  assert up.shape == (2, 12, 16, 2)
  np.testing.assert_array_equal(up, np.repeat(np.repeat(grid, 4, axis=1), 4, axis=2))
  np.testing.assert_allclose(up.sum((1, 2)), 16 * np.asarray(grid).sum((1, 2)))
  # Each image pixel shows the value of the grid cell feature_pixel assigns it.
  for row, col in [(0, 0), (5, 9), (11, 15), (4, 3)]:
    cell = attention_maps.feature_pixel((row, col), (12, 16, 3), (3, 4))
    np.testing.assert_array_equal(up[:, row, col], np.asarray(grid)[:, cell[0], cell[1]])
  assert attention_maps.feature_pixel((37, 10), (64, 64), (16, 16)) == (9, 2)
  assert attention_maps.feature_pixel((-1, -1), (64, 64), (16, 16)) == (15, 15)
  smooth = attention_maps.upsample(grid, (12, 16), method="linear")
  assert smooth.shape == (2, 12, 16, 2)


def test_errors():
  weights = np.zeros((4, 5, 1, 3, 3), np.float32)
  with pytest.raises(ValueError, match="i=4 is outside"):
    attention_maps.pixel_map(weights, 4, 0)
  with pytest.raises(ValueError, match="j=-6 is outside"):
    attention_maps.pixel_map(weights, 0, -6)
  with pytest.raises(TypeError, match="i must be an int"):
    attention_maps.pixel_map(weights, 1.5, 0)
  with pytest.raises(ValueError, match=r"\(\.\.\., H, W, N, kh, kw\)"):
    attention_maps.pixel_map(weights[0], 0, 0)
  with pytest.raises(ValueError, match="row=64 is outside"):
    attention_maps.feature_pixel((64, 0), (64, 64), (16, 16))
  with pytest.raises(ValueError, match=r"\(\.\.\., h, w, N\)"):
    attention_maps.upsample(np.zeros((4, 4)), (8, 8))
