"""Default config: a tiny SASA network on scikit-learn's 8x8 handwritten digits.

Runs with no network and no prepared data (the digits ship inside scikit-learn):
``python train.py`` reaches >= 95% test accuracy in about two minutes on 2 CPU
cores. Every other config starts from this one and changes a few fields, so this
file also lists (and documents) every key the training code reads.
"""

import ml_collections


def get_config():
  """The tiny digits run; the base of every other config."""
  config = ml_collections.ConfigDict()

  # Model: a name from `sasa_jax.models.list_models()` and keyword overrides
  # passed to `models.create(name, num_classes, **model_overrides)`.
  config.model = "sasa_tiny"
  config.model_overrides = ml_collections.ConfigDict()
  # Compute dtype of the model ('float32' or 'bfloat16'); parameters stay float32.
  config.compute_dtype = "float32"

  # Data: 'digits' (embedded) or a TFDS name; `data_dir` None = TFDS's default.
  config.dataset = "digits"
  config.data_dir = None
  config.data_download = True  # Let TFDS download and prepare a missing dataset.
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 8
  config.augmentation = "none"  # 'none' | 'cifar' | 'inception'.
  config.eval_preprocessing = "none"  # 'none' | 'center_crop'.
  config.eval_crop_fraction = 0.875  # Used by 'center_crop'.
  # Per-channel normalisation of x / 255 (on device).
  config.normalization_mean = (0.5,)
  config.normalization_std = (0.5,)
  config.data_workers = 0  # grain worker processes (0: read in this process).
  config.data_threads = 1  # grain reader threads per process.
  config.data_prefetch = 4  # Batches prefetched by each reader.

  # Run length and batches (global batch over all devices of all hosts).
  config.seed = 0
  config.batch_size = 64
  config.eval_batch_size = 360
  config.num_train_steps = 600
  config.num_eval_steps = -1  # -1: the whole eval split.

  # Optimizer: 'sgd' (Nesterov momentum) or 'adamw'.
  config.optimizer = "sgd"
  config.learning_rate = 0.1  # Peak learning rate, after warm-up.
  config.lr_schedule = "cosine"  # 'cosine' (to 0 at num_train_steps) | 'constant'.
  config.warmup_steps = 30  # Linear warm-up from 0.
  config.momentum = 0.9
  config.nesterov = True
  config.adam_b1 = 0.9
  config.adam_b2 = 0.999
  config.weight_decay = 5e-4  # Not applied to BatchNorm parameters and biases.
  config.grad_clip_norm = 0.0  # Clip the global gradient norm; 0: off.
  config.label_smoothing = 0.0
  config.ema_decay = 0.0  # EMA of the weights (evaluated, checkpointed); 0: off.

  # Loop.
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  config.max_to_keep = 3
  config.async_checkpointing = True

  return config


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
