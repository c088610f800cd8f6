"""Experiments run with sasa_jax (never run as tests): ``python -m experiments.ablations``,
the paper's ablations at small scale. See ``experiments/README.md`` for the results."""
