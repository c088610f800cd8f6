"""A run's workdir: its layout, its checkpoints (Orbax, with the run's config and the
checksums of its arrays), the lock that keeps it to one run, and the signals that stop a
run cleanly.

* :mod:`~sasa_jax.workdir.layout`: what a workdir holds, atomic JSON files;
* :mod:`~sasa_jax.workdir.checkpointer`: ``Checkpointer`` (save, verify, restore, move
  damaged checkpoints aside), with :mod:`~sasa_jax.workdir.checksums` and
  :mod:`~sasa_jax.workdir.orbax_errors` (Orbax's and TensorStore's failures, readable);
* :mod:`~sasa_jax.workdir.lock`: one run per workdir;
* :mod:`~sasa_jax.workdir.signals`: SIGTERM before and after the first step.
"""
