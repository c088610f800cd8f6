"""Flax (linen) modules of SASA: the local self-attention layer and the attention stem.

Inputs and outputs are NHWC: ``(B, H, W, C)``. Paper: Ramachandran et al., "Stand-Alone
Self-Attention in Vision Models", NeurIPS 2019, §3 (``LocalSelfAttention``) and §3.2
(``AttentionStem``). Both call the functional op in :mod:`sasa_jax.ops` (or, for the stem,
contract its projections themselves) and hold only parameters.
"""

from sasa_jax.layers.attention_stem import AttentionStem
from sasa_jax.layers.local_self_attention import POSITIONAL_MODES, LocalSelfAttention

__all__ = ["POSITIONAL_MODES", "AttentionStem", "LocalSelfAttention"]
