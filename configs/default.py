"""Default config: a tiny SASA network on scikit-learn's 8x8 handwritten digits.

Runs with no network and no prepared data (the digits ship inside scikit-learn):
``python train.py`` reaches >= 95% test accuracy in about a minute on 2 CPU cores.
Every other config starts from this one and changes a few fields, so this file also
lists (and documents) every key the training code reads.

The config is locked: assigning a key that does not exist (a typo) is an error, from
Python as from the command line (``--config.<key>=<value>``). Keys whose default is
``placeholder(type)`` are unset (None) until given a value of that type.

Run length and learning rate follow the data and the batch:

* ``num_train_steps = round(num_epochs * train examples / batch_size)``, unless set;
  likewise ``warmup_steps``, ``eval_every_steps`` and ``checkpoint_every_steps`` from
  ``warmup_epochs``, ``eval_every_epochs`` and ``checkpoint_every_epochs``.
* The peak learning rate is ``base_learning_rate * batch_size / base_batch_size``
  (linear scaling, Goyal et al. 2017): a batch override keeps the recipe.

The run prints what it derived (steps, warm-up, peak learning rate) when it starts.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def model_overrides() -> ml_collections.ConfigDict:
  """Keyword overrides of the registered model's ``ResNet`` fields; None: keep the
  registered value. E.g. ``--config.model_overrides.kernel_size=5`` (paper §4.2's
  ablations: ``kernel_size``, ``positional``, ``content``, ``stem_mixtures``, ``spatial``).
  """
  return ml_collections.ConfigDict({
      "stage_sizes": placeholder(tuple),  # Blocks per stage, e.g. (3, 4, 6, 3).
      "width": placeholder(int),  # First stage's bottleneck width (and the stem's).
      "spatial": placeholder(object),  # 'conv' | 'attention', or one per stage.
      "stem": placeholder(str),  # 'conv' | 'attention'.
      "small_inputs": placeholder(bool),  # A stem without downsampling.
      "stem_pool": placeholder(int),  # Max-pooling that ends a small-input stem.
      "kernel_size": placeholder(object),  # Attention window k, or (kh, kw).
      "num_heads": placeholder(int),
      "positional": placeholder(str),  # 'relative' | 'absolute' | 'none'.
      "content": placeholder(bool),  # False: drop the q.k term (q.r only).
      "implementation": placeholder(str),  # An ops.IMPLEMENTATIONS name; None: auto.
      "stem_heads": placeholder(int),
      "stem_block_size": placeholder(int),
      "stem_mixtures": placeholder(int),  # 1: a plain attention stem.
  })


def get_config():
  """The tiny digits run; the base of every other config."""
  config = ml_collections.ConfigDict()

  # Model: a name from `sasa_jax.models.list_models()` and overrides of its fields.
  config.model = "sasa_tiny"
  config.model_overrides = model_overrides()
  # Compute dtype of the model ('float32' or 'bfloat16'); parameters stay float32.
  config.compute_dtype = "float32"

  # Data: 'digits' (embedded) or a TFDS name; `data_dir` unset: TFDS's default.
  config.dataset = "digits"
  config.data_dir = placeholder(str)
  config.data_download = True  # Let TFDS download and prepare a missing dataset.
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 8
  config.augmentation = "none"  # 'none' | 'flip' | 'cifar' | 'inception'.
  config.eval_preprocessing = "none"  # 'none' | 'center_crop'.
  config.eval_crop_fraction = 0.875  # Used by 'center_crop'.
  # Per-channel normalisation of x / 255 (on device).
  config.normalization_mean = (0.5,)
  config.normalization_std = (0.5,)
  config.data_workers = 0  # grain worker processes (0: read in this process).
  config.data_threads = 1  # grain reader threads per process.
  config.data_prefetch = 4  # Batches prefetched by each reader.

  # Run length (in epochs of the train split) and batches (global: all devices, hosts).
  config.seed = 0
  config.batch_size = 64
  config.eval_batch_size = 360
  config.num_epochs = 27.0  # 1437 train digits, 64 per batch: 606 steps.
  config.num_train_steps = placeholder(int)  # Set: overrides num_epochs.
  config.num_eval_steps = -1  # -1: the whole eval split.

  # Optimizer: 'sgd' (Nesterov momentum) or 'adamw'.
  config.optimizer = "sgd"
  # Peak learning rate per `base_batch_size` images (after warm-up); scaled linearly.
  config.base_learning_rate = 0.4  # 0.1 at batch 64.
  config.base_batch_size = 256
  config.lr_schedule = "cosine"  # 'cosine' (to 0 at num_train_steps) | 'constant'.
  config.warmup_epochs = 1.0  # Linear warm-up from 0.
  config.warmup_steps = placeholder(int)  # Set: overrides warmup_epochs.
  config.momentum = 0.9
  config.nesterov = True
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.weight_decay = 5e-4  # Not applied to BatchNorm parameters and biases.
  config.grad_clip_norm = 0.0  # Clip the global gradient norm; 0: off.
  config.label_smoothing = 0.0
  # EMA of the weights (evaluated, checkpointed); 0: off. `ema_warmup` uses
  # min(ema_decay, (1 + t) / (10 + t)) at step t (TF's num_updates rule) instead of
  # the constant `ema_decay` (what the paper states).
  config.ema_decay = 0.0
  config.ema_warmup = False

  # Loop: intervals in epochs, or in steps when the `*_steps` key is set.
  config.log_every_steps = 50
  config.eval_every_epochs = 9.0
  config.eval_every_steps = placeholder(int)
  config.checkpoint_every_epochs = 9.0
  config.checkpoint_every_steps = placeholder(int)
  config.max_to_keep = 3
  config.async_checkpointing = True

  return config.lock()


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
