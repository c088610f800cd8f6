"""sasa_jax: Stand-Alone Self-Attention vision models in JAX/Flax.

Ramachandran et al., "Stand-Alone Self-Attention in Vision Models", NeurIPS 2019
(arXiv 1906.05909). The package by concern; data flows one way, op -> layer -> model ->
train step -> loop:

* the research core: ``ops`` (the functional local-attention op and its
  implementations) -> ``layers`` (the SASA layer and the attention stem, Flax) ->
  ``models`` (ResNet-26/38/50, SASA and convolutional, and their registry);
  ``attention_maps`` reads the attention weights of layers and models for pictures;
* ``config``: every config key declared once (default, allowed values, scope), and the
  checks that read that declaration;
* ``data``: dataset sources, TFDS preparation, preprocessing, the input pipeline;
* ``training``: the train state and steps, the optimizer, the run plan, the loop,
  evaluation and what a run reports;
* ``workdir``: checkpoints with checksums, the workdir's lock and layout, signals;
* ``distributed``: the device mesh, and runs of several processes (``jax.distributed``);
* ``errors``: the errors a user can fix, which ``train.py`` prints in one line.
"""

__version__ = "0.1.0"
