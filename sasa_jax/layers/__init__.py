"""Flax (linen) modules of SASA: the local self-attention layer and the attention stem.

Inputs and outputs are NHWC: ``(B, H, W, C)``. Paper: Ramachandran et al., "Stand-Alone
Self-Attention in Vision Models", NeurIPS 2019, §3 (``LocalSelfAttention``) and §3.2
(``AttentionStem``, and ``PooledBatchNorm``, the BatchNorm, ReLU and max-pooling that
follow it, from its block statistics). The attention layers call the functional ops in
:mod:`sasa_jax.ops` (``local_attention``, ``stem``) and hold only parameters.
"""

from sasa_jax.layers.attention_stem import AttentionStem
from sasa_jax.layers.local_self_attention import POSITIONAL_MODES, LocalSelfAttention
from sasa_jax.layers.pooled_norm import PooledBatchNorm

__all__ = ["POSITIONAL_MODES", "AttentionStem", "LocalSelfAttention", "PooledBatchNorm"]
