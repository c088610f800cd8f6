"""sasa_jax: Stand-Alone Self-Attention vision models in JAX/Flax.

Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019
(arXiv 1906.05909). Data flows one way: ``ops`` (the functional local-attention op)
-> ``layers`` (Flax modules) -> ``models`` (ResNets) -> ``training`` (the loop, with
``datasets`` -> ``preprocessing`` -> ``input_pipeline``, ``optimizers``, ``parallel``
and ``checkpointing``);
``attention_maps`` reads the attention weights of layers and models for visualisation.
"""

__version__ = "0.1.0"
