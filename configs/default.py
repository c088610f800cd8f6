"""Default config: a tiny SASA network on scikit-learn's 8x8 handwritten digits.

Runs with no network and no prepared data (the digits ship inside scikit-learn):
``python train.py`` reaches >= 95% test accuracy in about a minute on 2 CPU cores.

It is every key at its declared default: ``sasa_jax/config/keys.py`` declares each key
once (default, allowed values, and whether it may change on resume or differ between
hosts) and documents it; ``python -m sasa_jax.config`` prints them as a table. Every
other config starts from this one and changes a few keys. The config is locked:
assigning a key that does not exist (a typo) is an error, from Python as from the command
line (``--config.<key>=<value>``).

Run length and learning rate follow the data and the batch:

* ``num_train_steps = round(num_epochs * train examples / batch_size)``, unless set;
  likewise ``warmup_steps``, ``eval_every_steps`` and ``checkpoint_every_steps`` from
  ``warmup_epochs``, ``eval_every_epochs`` and ``checkpoint_every_epochs``.
* The peak learning rate is ``base_learning_rate * batch_size / base_batch_size``
  (linear scaling, Goyal et al. 2017): a batch override keeps the recipe.
"""

from sasa_jax.config import keys


def get_config():
  """The tiny digits run (``sasa_tiny``, 27 epochs of 1437 digits at batch 64: 606
  steps); the base of every other config."""
  return keys.default_config()


def for_model(model: str, models: tuple[str, ...], config_file: str):
  """This config with ``config.model = model``, one of ``models`` (``''``: the first).

  The base of the per-dataset configs, whose ``get_config(model)`` takes the model from
  ``--config=configs/<file>.py:<model>``.
  """
  model = model or models[0]
  if model not in models:
    raise ValueError(f"configs/{config_file}: model must be one of {list(models)}; "
                     f"got {model!r}.")
  config = get_config()
  config.model = model
  return config
