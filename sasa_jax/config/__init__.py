"""Run configs: every key declared once (:mod:`~sasa_jax.config.keys`: default, allowed
values, scope) and the checks that read that declaration (:mod:`~sasa_jax.config.checks`).

The config files in ``configs/`` start from ``keys.default_config()`` and change a few
keys; ``python -m sasa_jax.config`` lists every key.
"""
