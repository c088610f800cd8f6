"""The functional local-attention op of SASA (paper §3.1) and its implementations.

``local_attention(query, key, value, kernel_size=..., rel_h=..., rel_w=...)`` computes,
for every pixel ``(i, j)`` and head, attention over its ``kh x kw`` memory block::

    logit(i,j -> a,b) = scale * (q_ij . k_ab + q_ij[:d/2] . rel_h[a-i+rh]
                                             + q_ij[d/2:] . rel_w[b-j+rw])
    out_ij = sum over in-image (a, b) with |a-i| <= rh, |b-j| <= rw of
             softmax(logit) * v_ab

Neighbours outside the image are excluded from the softmax (not zero-padded). Two options
go beyond the paper: ``dilation`` (the window's pixels ``δ`` apart, DiNAT's) and
``borders='shift'`` (the window shifted to stay inside the image, NATTEN's neighbourhood
attention); ``_contract`` defines both exactly. Every name in ``IMPLEMENTATIONS`` computes
this same function (``SUPPORTED_BORDERS``: which take shifted borders).

``sasa_jax.ops.stem`` is the attention stem's op (paper §3.2: attention within blocks,
spatially-aware values) and its block statistics, with TPU kernels of their own.
"""

from sasa_jax.ops.local_attention import (BORDERS, IMPLEMENTATIONS, SUPPORTED_BORDERS,
                                          attention_weights, check_implementation,
                                          check_platform, check_window,
                                          default_implementation, local_attention,
                                          relative_table_rows, window_shape)

__all__ = [
    "BORDERS", "IMPLEMENTATIONS", "SUPPORTED_BORDERS", "attention_weights",
    "check_implementation", "check_platform", "check_window", "default_implementation",
    "local_attention", "relative_table_rows", "window_shape"
]
