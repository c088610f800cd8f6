"""Devices and hosts: the data-parallel mesh (:mod:`~sasa_jax.distributed.mesh`), the
settings of a multi-process run (:mod:`~sasa_jax.distributed.settings`), and starting
``jax.distributed`` with the check that the processes agree
(:mod:`~sasa_jax.distributed.processes`)."""
