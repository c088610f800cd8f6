"""Every config key, declared once: its default, its allowed values and its scope.

``default_config()`` builds the locked ``ml_collections.ConfigDict`` that every config
file starts from (``configs/default.py`` returns it as it is: the tiny digits run), so
ml_collections itself refuses an unknown key or a value of the wrong type, from Python
and from the command line. Validation (:mod:`sasa_jax.config.checks`), the check of a
resumed run against its checkpoint and the check that the processes of a multi-process
run agree all read :data:`KEYS`. ``python -m sasa_jax.config`` prints them as a table.

Scopes:

* ``run``: part of the experiment. A resume with another value is refused, and every
  process of a run must have the same value.
* ``loop``: steers the loop (its length, intervals, checkpoints, evaluation batches). It
  may change when a run is resumed (a warning lists the changes); every process of a run
  must have the same value.
* ``host``: a host's own setting (where the data is, how many readers). It may change on
  resume and differ between the processes of a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import numbers
from collections.abc import Callable
from typing import Any

import ml_collections
from ml_collections.config_dict import placeholder

# The training augmentations and evaluation preprocessings (sasa_jax.data.preprocessing
# implements them).
AUGMENTATIONS = ("none", "flip", "cifar", "inception")
EVAL_PREPROCESSINGS = ("none", "center_crop")


class Scope(enum.Enum):
  RUN = "run"
  LOOP = "loop"
  HOST = "host"


@dataclasses.dataclass(frozen=True)
class Allowed:
  """The values a key takes: ``check(value)`` and what it accepts, in words."""

  check: Callable[[Any], bool]
  description: str


@dataclasses.dataclass(frozen=True)
class Unset:
  """The default of a key that is unset (None) until given a value of ``type``."""

  type: type


@dataclasses.dataclass(frozen=True)
class Key:
  """A config key. ``evaluation``: ``train.py --mode=evaluate`` may set it on top of the
  config saved with the checkpoint (as it may the keys of scope ``host``)."""

  name: str
  default: Any  # A value, an ``Unset``, or a function returning a ConfigDict.
  allowed: Allowed
  scope: Scope
  doc: str
  evaluation: bool = False


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int(minimum: int, description: str) -> Allowed:
  return Allowed(lambda v: _is_int(v) and v >= minimum, description)


POSITIVE_INT = _int(1, "a positive int")
BOOL = Allowed(lambda v: isinstance(v, bool), "True or False")
NAME = Allowed(lambda v: isinstance(v, str) and bool(v), "a non-empty string")


def _number(description: str, lo: float, hi: float = float("inf"), lo_open: bool = False,
            hi_open: bool = False) -> Allowed:
  def check(v) -> bool:
    if not isinstance(v, numbers.Real) or isinstance(v, bool):
      return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  return Allowed(check, description)


def _one_of(*choices: str) -> Allowed:
  return Allowed(lambda v: v in choices, " | ".join(map(repr, choices)))


def _unset_or(allowed: Allowed, unset_means: str) -> Allowed:
  return Allowed(lambda v: v is None or allowed.check(v),
                 f"None ({unset_means}) or {allowed.description}")


def _floats(positive: bool) -> Allowed:
  def check(v) -> bool:
    return (isinstance(v, (tuple, list)) and len(v) > 0 and
            all(isinstance(x, numbers.Real) and (x > 0 or not positive) for x in v))
  what = "positive floats" if positive else "floats"
  return Allowed(check, f"a tuple of {what} (one per channel, or one)")


UNIT_INTERVAL = _number("a float in [0, 1)", 0, 1, hi_open=True)


def model_overrides() -> ml_collections.ConfigDict:
  """Keyword overrides of the registered model's ``ResNet`` fields (``models.OVERRIDES``);
  None keeps the registered value. ``models.create`` checks them."""
  return ml_collections.ConfigDict({
      "stage_sizes": placeholder(tuple),  # Blocks per stage, e.g. (3, 4, 6, 3).
      "width": placeholder(int),  # First stage's bottleneck width (and the stem's).
      "spatial": placeholder(object),  # 'conv' | 'attention', or one per stage.
      "stem": placeholder(str),  # 'conv' | 'attention'.
      "small_inputs": placeholder(bool),  # A stem without downsampling.
      "stem_pool": placeholder(int),  # Max-pooling that ends a small-input stem.
      "kernel_size": placeholder(object),  # Attention window k, or (kh, kw).
      "dilation": placeholder(object),  # Window pixels this far apart; or one per stage.
      "borders": placeholder(str),  # 'exclude' (SASA) | 'shift' (neighbourhood attention).
      "num_heads": placeholder(int),
      "positional": placeholder(str),  # 'relative' | 'absolute' | 'none'.
      "content": placeholder(bool),  # False: drop the q.k term (q.r only).
      "implementation": placeholder(str),  # An ops.IMPLEMENTATIONS name; None: auto.
      "stem_heads": placeholder(int),
      "stem_block_size": placeholder(int),
      "stem_mixtures": placeholder(int),  # 1: a plain attention stem.
  })


RUN, LOOP, HOST = Scope.RUN, Scope.LOOP, Scope.HOST

KEYS: tuple[Key, ...] = (
    # Model.
    Key("model", "sasa_tiny", Allowed(lambda v: isinstance(v, str) and bool(v),
                                      "a name from sasa_jax.models.list_models()"), RUN,
        "The registered model (models.list_models())."),
    Key("model_overrides", model_overrides,
        Allowed(lambda v: isinstance(v, ml_collections.ConfigDict),
                "overrides of ResNet fields (models.OVERRIDES)"), RUN,
        "Overrides of the model's ResNet fields, e.g. model_overrides.kernel_size=5."),
    Key("compute_dtype", "float32", _one_of("float32", "bfloat16"), RUN,
        "The model's computation dtype; parameters stay float32."),
    # Data.
    Key("dataset", "digits", Allowed(lambda v: isinstance(v, str) and bool(v),
                                     "'digits' or a TFDS dataset name"), RUN,
        "'digits' (scikit-learn's, embedded) or a TFDS image-classification name."),
    Key("data_dir", Unset(str), _unset_or(NAME, "TFDS's default"), HOST,
        "The TFDS data_dir (None: ~/tensorflow_datasets)."),
    Key("data_download", True, BOOL, HOST,
        "Let TFDS download and prepare a dataset that is not prepared."),
    Key("train_split", "train", NAME, RUN, "The training split (slices such as "
        "train[:90%] work)."),
    Key("eval_split", "test", NAME, RUN, "The evaluation split.", evaluation=True),
    Key("image_size", 8, POSITIVE_INT, RUN, "The model's input height and width."),
    Key("augmentation", "none", _one_of(*AUGMENTATIONS), RUN,
        "Training augmentation: none, flip, cifar (pad-4 crop + flip) or inception."),
    Key("eval_preprocessing", "none", _one_of(*EVAL_PREPROCESSINGS), RUN,
        "Evaluation preprocessing: none or center_crop.", evaluation=True),
    Key("eval_crop_fraction", 0.875, _number("a float in (0, 1]", 0, 1, lo_open=True), RUN,
        "The central crop's share of the shorter side (center_crop).", evaluation=True),
    Key("normalization_mean", (0.5,), _floats(positive=False), RUN,
        "Per-channel mean of x / 255, subtracted on the device."),
    Key("normalization_std", (0.5,), _floats(positive=True), RUN,
        "Per-channel std of x / 255, divided by on the device."),
    Key("data_workers", 0, _int(0, "an int >= 0"), HOST,
        "grain worker processes that decode and augment (0: in this process)."),
    Key("data_threads", 1, POSITIVE_INT, HOST, "grain reader threads per process."),
    Key("data_prefetch", 4, POSITIVE_INT, HOST, "Batches prefetched by each reader."),
    # Run length and batches (global: over all devices and hosts).
    Key("seed", 0, _int(0, "an int >= 0"), RUN, "Initialisation, data order, augmentation."),
    Key("batch_size", 64, POSITIVE_INT, RUN, "The global training batch."),
    Key("eval_batch_size", 360, POSITIVE_INT, LOOP, "The global evaluation batch.",
        evaluation=True),
    Key("num_epochs", 27.0, _number("a float >= 0 (epochs of the train split)", 0), LOOP,
        "The run's length in epochs of the train split (1437 digits, batch 64: 606 steps)."),
    Key("num_train_steps", Unset(int), _unset_or(_int(0, "an int >= 0"), "from num_epochs"),
        LOOP, "The run's length in steps; overrides num_epochs."),
    Key("num_eval_steps", -1, Allowed(lambda v: _is_int(v) and (v == -1 or v > 0),
                                      "-1 (the whole split) or a positive int"), LOOP,
        "Evaluation batches; -1: the whole eval split.", evaluation=True),
    # Optimizer and schedule.
    Key("optimizer", "sgd", _one_of("sgd", "adamw"), RUN,
        "'sgd' (Nesterov momentum) or 'adamw'."),
    Key("base_learning_rate", 0.4, _number("a float > 0", 0, lo_open=True), RUN,
        "Peak learning rate per base_batch_size images, scaled linearly with the batch "
        "(0.1 at batch 64)."),
    Key("base_batch_size", 256, POSITIVE_INT, RUN, "The batch base_learning_rate is for."),
    Key("lr_schedule", "cosine", _one_of("cosine", "constant"), RUN,
        "After the warm-up: cosine decay to 0 at the last step, or constant."),
    Key("warmup_epochs", 1.0, _number("a float >= 0", 0), RUN,
        "Linear warm-up from 0, in epochs."),
    Key("warmup_steps", Unset(int), _unset_or(_int(0, "an int >= 0"), "from warmup_epochs"),
        RUN, "Linear warm-up in steps; overrides warmup_epochs."),
    Key("momentum", 0.9, UNIT_INTERVAL, RUN, "SGD momentum."),
    Key("nesterov", True, BOOL, RUN, "Nesterov momentum (SGD)."),
    Key("adam_b1", 0.9, UNIT_INTERVAL, RUN, "AdamW's beta1."),
    Key("adam_b2", 0.999, UNIT_INTERVAL, RUN, "AdamW's beta2."),
    Key("weight_decay", 5e-4, _number("a float >= 0", 0), RUN,
        "On kernels and embeddings, not on BatchNorm parameters and biases."),
    Key("grad_clip_norm", 0.0, _number("a float >= 0 (0: off)", 0), RUN,
        "Clip the global gradient norm; 0: off."),
    Key("label_smoothing", 0.0, UNIT_INTERVAL, RUN, "Label smoothing of the targets."),
    Key("ema_decay", 0.0, _number("a float in [0, 1) (0: off)", 0, 1, hi_open=True), RUN,
        "EMA of the weights (evaluated, checkpointed); 0: off."),
    Key("ema_warmup", False, BOOL, RUN,
        "Use min(ema_decay, (1 + t) / (10 + t)) at step t (TensorFlow's num_updates rule) "
        "instead of the constant ema_decay (what the paper states)."),
    # Loop: intervals in epochs, or in steps when the *_steps key is set.
    Key("log_every_steps", 50, POSITIVE_INT, LOOP, "Train metrics every so many steps."),
    Key("eval_every_epochs", 9.0, _number("a float > 0", 0, lo_open=True), LOOP,
        "Evaluate every so many epochs (and at the end)."),
    Key("eval_every_steps", Unset(int), _unset_or(POSITIVE_INT, "from eval_every_epochs"),
        LOOP, "Evaluate every so many steps; overrides eval_every_epochs."),
    Key("checkpoint_every_epochs", 9.0, _number("a float > 0", 0, lo_open=True), LOOP,
        "Checkpoint every so many epochs (and at the end)."),
    Key("checkpoint_every_steps", Unset(int),
        _unset_or(POSITIVE_INT, "from checkpoint_every_epochs"), LOOP,
        "Checkpoint every so many steps; overrides checkpoint_every_epochs."),
    Key("max_to_keep", 3, POSITIVE_INT, LOOP, "Checkpoints kept (the newest)."),
    Key("async_checkpointing", True, BOOL, LOOP, "Save checkpoints in the background."),
)

BY_NAME: dict[str, Key] = {key.name: key for key in KEYS}


def _value(default: Any) -> Any:
  if isinstance(default, Unset):
    return placeholder(default.type)
  return default() if callable(default) else default


def default_config() -> ml_collections.ConfigDict:
  """A locked ConfigDict holding every key at its default: the tiny digits run."""
  config = ml_collections.ConfigDict()
  for key in KEYS:
    config[key.name] = _value(key.default)
  return config.lock()


def default_value(name: str) -> Any:
  """The default of key ``name`` as a plain value (a ConfigDict as a dict; unset: None)."""
  value = _value(BY_NAME[name].default)
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  if isinstance(value, ml_collections.FieldReference):  # An unset placeholder.
    return value.get()
  return value


def keys_in(scope: Scope) -> frozenset[str]:
  return frozenset(key.name for key in KEYS if key.scope is scope)


def settable_when_evaluating() -> frozenset[str]:
  """The keys that ``--mode=evaluate`` may set on top of a checkpoint's saved config."""
  return frozenset(key.name for key in KEYS if key.evaluation or key.scope is Scope.HOST)


def paths() -> list[str]:
  """Every settable dotted path: the keys and ``model_overrides.<field>``."""
  nested = [f"model_overrides.{field}" for field in model_overrides()]
  return [key.name for key in KEYS] + nested


def closest(path: str) -> list[str]:
  """The settable paths closest to a misspelt ``path``, best first."""
  return difflib.get_close_matches(path, paths(), n=3, cutoff=0.8)
