"""Fashion-MNIST (TFDS `fashion_mnist`): SASA ResNets for 28x28 grayscale and their baseline.

    python train.py --config=configs/fashion_mnist.py                         # full attention
    python train.py --config=configs/fashion_mnist.py:sasa_fmnist_conv_stem
    python train.py --config=configs/fashion_mnist.py:resnet_fmnist           # conv baseline
    python train.py --config=configs/fashion_mnist.py --config.data_dir=DIR   # offline

The paper's recipe (appendix) scaled down to a small data set and a 2-core CPU: Nesterov
momentum SGD, linear warm-up then cosine decay, label smoothing 0.1, weight decay not on
BatchNorm/bias; random horizontal flips (clothes are left-right symmetric; the paper's
inception crop would cut most of a 28x28 garment away).

`sweep` (big_vision's convention: a function beside the config that calls `add(**config
overrides)` once per run) lists the runs of the paper's §4 comparisons, `ABLATIONS`;
`python -m experiments.ablations` trains them with a `BUDGETS` entry and writes a report.
"""

import dataclasses

from configs import default

MODELS = ("sasa_fmnist", "sasa_fmnist_conv_stem", "resnet_fmnist")


def get_config(model: str = "sasa_fmnist"):
  """Fashion-MNIST config; `model` is chosen with `--config=configs/fashion_mnist.py:<model>`."""
  config = default.for_model(model, MODELS, "fashion_mnist.py")

  config.dataset = "fashion_mnist"
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 28
  # Random horizontal flip: clothes are left-right symmetric. In a run of a few epochs the
  # pad-4 crop ('cifar') regularises more than it helps.
  config.augmentation = "flip"
  config.eval_preprocessing = "none"
  config.normalization_mean = (0.2860,)  # Of the training split.
  config.normalization_std = (0.3530,)

  config.batch_size = 128
  config.eval_batch_size = 1000
  # 88.48-88.77% over 3 seeds in 12-13 min on 2 CPU cores (README, Configs); 3 epochs
  # fell below 88% for one seed.
  config.num_epochs = 4.0

  config.optimizer = "sgd"  # Paper: Nesterov momentum SGD.
  config.nesterov = True
  config.momentum = 0.9
  config.base_learning_rate = 0.8  # Per 256 images: 0.4 at batch 128.
  config.lr_schedule = "cosine"  # Paper: linear warm-up, then cosine.
  config.warmup_epochs = 0.25
  config.weight_decay = 1e-4  # Not on BatchNorm parameters and biases (5e-4: 87.98%).
  config.label_smoothing = 0.1

  config.log_every_steps = 50
  config.eval_every_epochs = 1.0
  config.checkpoint_every_epochs = 1.0
  return config


# ---------------------------------------------------------------------------
# The paper's §4 comparisons (ImageNet; ResNet-50 with the conv stem unless noted).


@dataclasses.dataclass(frozen=True)
class Variant:
  """One arm of an ablation: a label, its config overrides, the paper's top-1 (%); for an
  ablation along an axis (the width), the ``series`` it belongs to (the model) and its
  ``x`` on the axis; ``seeds`` where it has more than its ablation's."""

  label: str
  overrides: dict
  paper: float | None = None
  series: str | None = None
  x: float | None = None
  seeds: int | None = None

  def num_seeds(self, ablation: "Ablation") -> int:
    return self.seeds or ablation.seeds


@dataclasses.dataclass(frozen=True)
class Ablation:
  """A comparison of variants, each trained with seeds ``0 .. seeds - 1``."""

  name: str
  title: str
  question: str
  seeds: int
  variants: tuple[Variant, ...]


CONV = Variant("conv baseline", {"model": "resnet_fmnist"}, 76.9)
CONV_STEM = Variant("conv stem + attention", {"model": "sasa_fmnist_conv_stem"}, 77.4)
FULL = Variant("full attention", {"model": "sasa_fmnist"}, 77.6)


def _conv_stem(label, paper, **model_overrides):
  """The conv-stem SASA model with ``model_overrides`` (the paper's ablation base)."""
  overrides = {f"model_overrides.{k}": v for k, v in model_overrides.items()}
  return Variant(label, {"model": "sasa_fmnist_conv_stem", **overrides}, paper)


# The paper's claim lives at ImageNet widths, where a SASA layer's 3·k²·C per pixel is
# below a 3x3 conv's 9·C² (C >= 64 at k = 7): the widths at which the FLOPs balance.
WIDTHS = (16, 32, 64)


def _at_width(base: Variant, width: int, seeds: int | None = None) -> Variant:
  return Variant(f"{base.label}, C = {width}",
                 {**base.overrides, "model_overrides.width": width}, base.paper,
                 series=base.label, x=width, seeds=seeds)


ABLATIONS = (
    Ablation("table1", "Convolution vs attention (Table 1, ResNet-50)",
             "Does attention match convolution with fewer parameters and FLOPs?", 3,
             (CONV, CONV_STEM, FULL)),
    Ablation("kernel", "Spatial extent k (§4.2)",
             "How does accuracy grow with the attention window?", 2,
             (_conv_stem("k = 3", 76.4, kernel_size=3), _conv_stem("k = 5", 77.2, kernel_size=5),
              _conv_stem("k = 7", 77.4), _conv_stem("k = 9", 77.7, kernel_size=9))),
    Ablation("positional", "Positional encoding (§4.2; paper: held-out validation split)",
             "Do relative positions beat absolute or none?", 3,
             (_conv_stem("none", 77.6, positional="none"),
              _conv_stem("absolute", 78.2, positional="absolute"),
              _conv_stem("relative", 80.2))),
    Ablation("content", "Content term (§4.2)",
             "Does q.k add to the positional term q.r?", 2,
             (_conv_stem("q.k + q.r", 77.4), _conv_stem("q.r only", 76.9, content=False))),
    Ablation("stem", "Attention stem (§4.2, full attention)",
             "Do spatially-aware values make an attention stem work?", 2,
             (Variant("plain attention stem", {"model": "sasa_fmnist",
                                               "model_overrides.stem_mixtures": 1}, 76.2),
              Variant("spatially-aware values", FULL.overrides, 77.6),
              Variant("conv stem", CONV_STEM.overrides, 77.4))),
    Ablation("conv_early", "Conv early, attention late (§4.2; paper: validation split)",
             "Is convolution better in the first stage and attention in the later ones?", 2,
             (Variant("all conv", CONV.overrides, 79.5),
              _conv_stem("conv stage 1, attention stage 2", 80.7,
                         spatial=("conv", "attention")),
              _conv_stem("all attention", 80.2))),
    Ablation("width", "Width: does attention catch up with convolution? (Table 1's regime)",
             "As the layers widen, does attention close its gap to convolution, as the "
             "FLOP balance 3·k²·C vs 9·C² predicts?", 2,
             (*(_at_width(v, w, seeds=3 if w == WIDTHS[-1] else None)
                for v in (CONV, CONV_STEM) for w in WIDTHS),
              _at_width(FULL, WIDTHS[-1]))),
    # Beyond the paper: the options that neighbourhood attention (NATTEN, DiNAT) added.
    Ablation("borders", "Window borders (neighbourhood attention; not in the paper)",
             "Does keeping every window k x k inside the map (shifted borders) beat SASA's "
             "centred windows that lose their outside pixels? At k = 7 on the 14x14 and 7x7 "
             "maps most pixels' windows differ.", 2,
             (_conv_stem("exclude (SASA)", None), _conv_stem("shift (NATTEN)", None,
                                                             borders="shift"))),
    Ablation("dilation", "Dilated windows in the first stage (DiNAT; not in the paper)",
             "Does a 13x13 receptive field at k = 7's cost (dilation 2 on the 14x14 map) help?",
             2,
             (_conv_stem("dilation 1", None), _conv_stem("dilation 2, then 1", None,
                                                         dilation=(2, 1)))),
)

# Overrides given to every run of the sweep: the same recipe and budget for all variants.
# `default`: 10,000 training images for 3 epochs, evaluated on the whole test split at
# 1.5 and 3 epochs; the first 27 runs took 1 h 17 min on a 2-core CPU, the 20 of the
# width, borders and dilation ablations (16 new) 2 h 8 min on one core
# (experiments/README.md). `quick`: a tiny smoke test of the whole pipeline (the tests run
# it). Scale up with more data and epochs (`train_split='train'`), or CIFAR-10 on a GPU
# (experiments/README.md).
BUDGETS = {
    "default": {
        "train_split": "train[:10000]", "num_epochs": 3.0, "warmup_epochs": 0.25,
        "eval_every_epochs": 1.5, "checkpoint_every_epochs": 1.5,
    },
    "quick": {
        "train_split": "train[:256]", "eval_split": "test[:200]", "batch_size": 32,
        "eval_batch_size": 200, "num_train_steps": 4, "warmup_steps": 1,
        "log_every_steps": 1, "eval_every_steps": 2, "checkpoint_every_steps": 2,
        "model_overrides.width": 8, "model_overrides.stage_sizes": (1, 1),
    },
}
# The quick budget trains at most this many seeds per variant.
MAX_SEEDS = {"default": None, "quick": 2}


def sweep(add, ablations=ABLATIONS, max_seeds=None):
  """Calls ``add(**overrides)`` once per run: every variant of ``ablations``, with seeds
  ``0 .. seeds - 1`` (at most ``max_seeds``). A variant shared by several ablations is
  added once per ablation; the runner trains it once."""
  for ablation in ablations:
    for variant in ablation.variants:
      seeds = variant.num_seeds(ablation)
      for seed in range(min(seeds, max_seeds or seeds)):
        add(**variant.overrides, seed=seed)
