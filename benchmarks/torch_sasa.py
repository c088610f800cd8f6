"""SASA as the popular PyTorch re-implementations write it, with the paper's semantics.

``TorchUnfoldSASA`` (built by :func:`torch_unfold_layer`, NCHW) unfolds K and V into
``k x k`` windows with ``F.unfold`` (a ``k^2``-fold copy), as those implementations do, but
with dot-product logits, relative row and column logits on the two halves of each query,
and border keys masked out of the softmax. The layer benchmark times it beside ours;
:func:`check_torch_layer` holds it to our ``reference`` with the weights copied across.
torch is optional: everything here imports it lazily.
"""

from __future__ import annotations

import jax
import numpy as np

from benchmarks import common
from sasa_jax.layers import LocalSelfAttention

NAME = "torch unfold"


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


def runner(channels, heads, kernel, x_nhwc, g_nhwc, mode):
  """``(run, peak bytes)``: one call of the torch layer in ``mode`` (``fwd`` under
  ``no_grad``, or ``fwd+bwd``) on NHWC inputs, and its peak live CPU allocations."""
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
