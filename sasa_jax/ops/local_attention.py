"""``local_attention``: argument checks, then dispatch to one implementation."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax

from sasa_jax.ops import _contract, blocked, fused, platforms, shifted, subgrids, tpu, windows

_IMPLEMENTATIONS = {
    "reference": windows.reference,
    "patches": windows.patches,
    "blocked": blocked.blocked,
    "shifted": shifted.shifted,
    "dense": blocked.dense,
    "fused": fused.fused,
    "tpu": tpu.tpu,
}
# The automatic choice runs the kernels of the compiler of the platform the program is
# for (``platforms.platform_dependent``): a program compiled for TPU from a CPU host
# runs Mosaic's kernels.
_ON_PLATFORM = {("gpu", "fused"): fused.triton, ("tpu", "tpu"): tpu.mosaic}
# Implementations that cannot run on a platform (not even interpreted).
_UNAVAILABLE = {"tpu": ("fused",), "gpu": ("tpu",)}
IMPLEMENTATIONS: tuple[str, ...] = tuple(_IMPLEMENTATIONS)
BORDERS = _contract.BORDERS
# The border modes each implementation computes; every one takes any dilation (on the
# image's sub-grids, ``ops.subgrids``; ``reference`` directly).
SUPPORTED_BORDERS = {name: BORDERS if name in ("reference", "blocked", "dense")
                     else ("exclude",) for name in IMPLEMENTATIONS}


def check_platform(implementation: str | None, backend: str) -> None:
  """ValueError if ``implementation`` cannot run on ``backend`` ('cpu', 'gpu', 'tpu'):
  ``fused`` is Triton's (interpreted off GPU), ``tpu`` Mosaic's (interpreted off TPU)."""
  if implementation in _UNAVAILABLE.get(backend, ()):
    runs_on = {"fused": "GPU (Triton), or interpreted on CPU",
               "tpu": "TPU (Mosaic), or interpreted on CPU"}[implementation]
    raise ValueError(f"implementation={implementation!r} cannot run on this platform, "
                     f"{backend}: it runs on {runs_on}. Use None (automatic) or another.")
# ``dense`` beats the windowed implementations up to about 4 k^2 pixels
# (benchmarks/README.md, ``--crossover``), on CPU and on an H200 ...
DENSE_MAX_PIXELS_PER_WINDOW = 4
# ... except against ``shifted`` on CPU at head depth <= 8, where it wins only up to 2 k^2.
SHALLOW_HEAD_DEPTH = 8
SHALLOW_DENSE_MAX_PIXELS_PER_WINDOW = 2
# On CPU, ``shifted`` beats ``blocked`` at head depths 8 to 32 at every measured shape,
# and not reliably at depth 64 (benchmarks/README.md, ``--shapes``, ``--crossover``),
# where its program (and compile time) also grows with the depth.
SHIFTED_MAX_HEAD_DEPTH = 32
# On GPU, ``fused`` beats ``blocked`` at head depth 8 (1.7x at 56x56) and not above
# (benchmarks/README.md, GPU): its per-thread tiles grow with the depth.
FUSED_MAX_HEAD_DEPTH = 8
# On TPU, the Mosaic kernels (``tpu``) keep the logits out of HBM at every shape
# (benchmarks/README.md, TPU: bytes accessed by the compiled training step); their code
# grows with the window's width, so global windows go to ``dense``.
TPU_MAX_KERNEL_SIZE = 15


def check_window(kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                 borders: str = "exclude") -> None:
  """ValueError (naming the argument and what it allows) unless ``kernel_size``,
  ``dilation`` and ``borders`` describe a window."""
  _contract.as_window(kernel_size, dilation, borders)


def relative_table_rows(kernel_size: int | Sequence[int], borders: str = "exclude"
                        ) -> tuple[int, int]:
  """The rows of ``rel_h`` and ``rel_w`` for this window and border mode."""
  return _contract.as_window(kernel_size, borders=borders).table_rows


def window_shape(kernel_size: int | Sequence[int]) -> tuple[int, int]:
  """``(kh, kw)`` of an odd ``kernel_size`` (int or pair); ValueError for anything else."""
  window = _contract.as_window(kernel_size)
  return window.kh, window.kw


def check_implementation(implementation: str | None, borders: str = "exclude") -> None:
  """ValueError unless ``implementation`` is one of ``IMPLEMENTATIONS`` (or None) and
  computes ``borders``."""
  if implementation is not None and implementation not in _IMPLEMENTATIONS:
    raise ValueError(
        f"implementation must be one of {list(IMPLEMENTATIONS)} or None (automatic); got "
        f"{implementation!r}.")
  _contract.check_borders(borders)
  if implementation is not None and borders not in SUPPORTED_BORDERS[implementation]:
    able = [n for n in IMPLEMENTATIONS if borders in SUPPORTED_BORDERS[n]]
    raise ValueError(
        f"implementation={implementation!r} does not compute borders={borders!r}; the "
        f"implementations that do: {able} (or None, automatic).")


def default_implementation(height: int, width: int, kernel_size: int | Sequence[int],
                           backend: str | None = None, head_depth: int | None = None,
                           borders: str = "exclude") -> str:
  """The implementation ``implementation=None`` uses for this shape (at dilation 1: a
  dilated window runs on sub-grids, each of which gets its own) on ``backend``.

  Chosen from the per-shape forward+backward timings in ``benchmarks/README.md`` (``python
  -m benchmarks.layers --shapes`` and ``--crossover``, on the 2-core CPU and on an H200):

  * ``dense`` while the image has at most ``DENSE_MAX_PIXELS_PER_WINDOW`` times as many
    pixels as the window (e.g. the 14x14 and 7x7 stages of the ImageNet models at k = 7),
    or ``SHALLOW_DENSE_MAX_PIXELS_PER_WINDOW`` times on CPU for heads of depth
    ``head_depth <= SHALLOW_HEAD_DEPTH``;
  * above that, on CPU (``backend`` ``"cpu"`` or None), ``shifted`` for ``head_depth <=
    SHIFTED_MAX_HEAD_DEPTH``, and on GPU (``backend == "gpu"``) ``fused`` (the Pallas
    kernel) for ``head_depth <= FUSED_MAX_HEAD_DEPTH``;
  * otherwise ``blocked`` with 4x4 blocks.

  On TPU (``backend == "tpu"``), ``tpu`` (the Mosaic kernels) for windows up to
  ``TPU_MAX_KERNEL_SIZE`` with excluded borders, whatever the image (measured by the TPU
  compiler, ``python -m benchmarks.tpu``); larger windows as above.

  None of them copies K and V ``k^2`` times. An unknown ``head_depth`` (None) never picks
  ``shifted`` or ``fused``; ``fused`` is never chosen off GPU, nor ``tpu`` off TPU, where
  they only run in interpret mode. With ``borders='shift'``: ``dense`` while the image
  is small, as above, else ``blocked`` (the implementations that compute it).
  """
  window = _contract.as_window(kernel_size, borders=borders)
  if (backend == "tpu" and borders == "exclude" and
      max(window.kh, window.kw) <= TPU_MAX_KERNEL_SIZE):
    return "tpu"
  on_cpu = backend in (None, "cpu") and head_depth is not None
  dense_limit = (SHALLOW_DENSE_MAX_PIXELS_PER_WINDOW
                 if on_cpu and head_depth <= SHALLOW_HEAD_DEPTH else DENSE_MAX_PIXELS_PER_WINDOW)
  if height * width <= dense_limit * window.kh * window.kw:
    return "dense"
  if borders != "exclude":
    return "blocked"
  if on_cpu and head_depth <= SHIFTED_MAX_HEAD_DEPTH:
    return "shifted"
  if backend == "gpu" and head_depth is not None and head_depth <= FUSED_MAX_HEAD_DEPTH:
    return "fused"
  return "blocked"


def local_attention(query: jax.Array, key: jax.Array, value: jax.Array, *,
                    kernel_size: int | Sequence[int], dilation: int | Sequence[int] = 1,
                    borders: str = "exclude", rel_h: jax.Array | None = None,
                    rel_w: jax.Array | None = None, scale: float | None = None,
                    implementation: str | None = None) -> jax.Array:
  """Multi-head local self-attention over a ``kh x kw`` window with 2-D relative logits.

  Args:
    query, key, value: ``(B, H, W, N, d)`` arrays of one floating dtype (batch, height,
      width, heads, head depth). Logits and softmax are computed in float32 whatever it is.
    kernel_size: the window, an odd int ``k`` or a pair ``(kh, kw)`` of odd ints. A window
      of at least ``(2H - 1) x (2W - 1)`` is global attention over the image.
    dilation: an int ``>= 1`` or a pair ``(dh, dw)``: the window's pixels are that far
      apart (DiNAT's dilation), widening it at the same cost.
    borders: ``'exclude'`` (SASA's: the window is centred on its query and the pixels
      outside the image are left out) or ``'shift'`` (neighbourhood attention, as NATTEN
      defines it: the window shifts to stay inside the image, so every query sees exactly
      ``kh x kw`` keys; needs ``H >= kh * dh`` and ``W >= kw * dw``). ``_contract``'s
      docstring gives the exact windows.
    rel_h: the embeddings of the row offsets, shared across heads, dotted with the first
      half of each query (needs even ``d``): ``(kh, d // 2)``, offset ``s`` (in window
      slots) at entry ``s + kh//2``; with ``borders='shift'`` ``(2 kh - 1, d // 2)``, the
      key ``s`` slots from its query's slot at entry ``s + kh - 1``.
    rel_w: the same for the column offsets, dotted with the second half. Give both tables
      or neither; without them there is no positional term.
    scale: multiplies the whole logit; defaults to ``d ** -0.5`` (``1.0`` is the paper's
      equation as printed).
    implementation: one of ``IMPLEMENTATIONS`` (``SUPPORTED_BORDERS`` says which compute
      ``borders='shift'``); ``None`` picks the fastest for the shape
      (``default_implementation``, per sub-grid when dilated).

  Returns:
    ``(B, H, W, N, d)`` in the dtype of ``query``: at each pixel, the softmax-weighted sum
    of the values in its window. Neighbours outside the image are excluded from the
    softmax.

  Raises:
    ValueError: while tracing, before compilation, for a wrong rank, mismatched shapes or
      dtypes, an even or non-positive window, a bad dilation or border mode, an image too
      small for shifted borders, relative tables of the wrong shape, an odd ``d`` with
      relative tables, a bad scale, an unknown implementation or one that does not compute
      the border mode.
  """
  window = _contract.as_window(kernel_size, dilation, borders)
  scale = _contract.check_arguments(query, key, value, window, rel_h, rel_w, scale)
  check_implementation(implementation, borders)
  check_platform(implementation, jax.default_backend())
  if implementation == "reference":  # Computes every dilation itself: the ground truth.
    return windows.reference(query, key, value, window=window, rel_h=rel_h, rel_w=rel_w,
                             scale=scale)
  return subgrids.on_subgrids(functools.partial(_attend, implementation=implementation),
                              query, key, value, window=window, rel_h=rel_h, rel_w=rel_w,
                              scale=scale)


def _attend(query, key, value, *, window, rel_h, rel_w, scale, implementation):
  """The op at dilation 1 with ``implementation``; None: this shape's default on the
  platform the program is lowered for."""
  arguments = dict(window=window, rel_h=rel_h, rel_w=rel_w, scale=scale)
  if implementation is not None:
    return _IMPLEMENTATIONS[implementation](query, key, value, **arguments)

  def choice(backend):
    return default_implementation(query.shape[1], query.shape[2], (window.kh, window.kw),
                                  backend, query.shape[-1], window.borders)

  choices = {backend: choice(backend) for backend in set(platforms.BACKENDS.values())}
  if len(set(choices.values())) == 1:
    return _IMPLEMENTATIONS[choices["cpu"]](query, key, value, **arguments)

  # One branch object per distinct function: platform_dependent traces each once.
  branches = {}

  def branch(function):
    return branches.setdefault(function, lambda q, k, v: function(q, k, v, **arguments))

  host = choices.get(jax.default_backend()) or choice(jax.default_backend())
  return platforms.platform_dependent(
      query, key, value,
      **{platform: branch(_ON_PLATFORM.get((backend, choices[backend]),
                                           _IMPLEMENTATIONS[choices[backend]]))
         for platform, backend in platforms.BACKENDS.items()},
      default=branch(_IMPLEMENTATIONS[host]))


def attention_weights(query: jax.Array, key: jax.Array, *, kernel_size: int | Sequence[int],
                      dilation: int | Sequence[int] = 1, borders: str = "exclude",
                      rel_h: jax.Array | None = None, rel_w: jax.Array | None = None,
                      scale: float | None = None) -> jax.Array:
  """The softmax probabilities that ``local_attention`` applies, for visualisation.

  Arguments as in ``local_attention``. Returns ``(B, H, W, N, eh, ew)`` float32 in a
  window centred on each query that holds every key it can have: entry ``[..., a, b]`` is
  the weight of pixel ``(i + a - eh//2, j + b - ew//2)`` in the output at ``(i, j)``, zero
  where that pixel is not one of its keys (outside the image, between dilated pixels, or
  outside a shifted window); each window sums to 1. ``eh = kh`` with the defaults,
  ``(kh - 1) * dh + 1`` with a dilation, ``2 (kh - 1) * dh + 1`` with shifted borders
  (likewise ``ew``). Holds a ``kh * kw``-fold copy of K: meant for inspecting a few
  images, not for training.
  """
  window = _contract.as_window(kernel_size, dilation, borders)
  scale = _contract.check_arguments(query, key, key, window, rel_h, rel_w, scale)
  return windows.window_probs(query, key, window=window, rel_h=rel_h, rel_w=rel_w, scale=scale)
