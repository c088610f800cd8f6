"""ImageNet (TFDS `imagenet2012`), the paper's Table 1 models and training recipe.

    python train.py --config=configs/imagenet.py:<model> --workdir=...

with <model> one of MODELS below (default `sasa_resnet50`, "full attention"):
`resnet{26,38,50}` (convolutional baselines), `sasa_resnet{26,38,50}_conv_stem`
("conv-stem + attention") and `sasa_resnet{26,38,50}` ("full attention").

From the paper (appendix): 130 epochs, Nesterov momentum SGD, batch 4096,
learning rate 1.6 with 10 epochs of linear warm-up then cosine decay, an exponential
moving average of the weights with decay 0.9999, BatchNorm over the global batch
(what data-parallel `jax.jit` computes). The run length is in epochs and the learning
rate scales linearly with the batch (0.1 per 256 images), so e.g.
`--config.batch_size=1024` keeps the recipe: 130 epochs, 10 of warm-up, peak LR 0.4.

NOT STATED in the paper; the common ResNet values (marked `# Unstated` below):
label smoothing 0.1, weight decay 1e-4 not on BatchNorm/bias, momentum 0.9,
224x224 inception-crop + flip for training, resize-256 / center-crop-224 for eval.
"""

from configs import default

MODELS = (
    "resnet26", "resnet38", "resnet50",
    "sasa_resnet26_conv_stem", "sasa_resnet38_conv_stem", "sasa_resnet50_conv_stem",
    "sasa_resnet26", "sasa_resnet38", "sasa_resnet50",
)


def get_config(model: str = "sasa_resnet50"):
  """ImageNet config; `model` is chosen with `--config=configs/imagenet.py:<model>`."""
  config = default.for_model(model or "sasa_resnet50", MODELS, "imagenet.py")

  config.dataset = "imagenet2012"
  config.train_split = "train"
  config.eval_split = "validation"
  config.image_size = 224  # Unstated.
  config.augmentation = "inception"  # Unstated.
  config.eval_preprocessing = "center_crop"  # Unstated.
  config.eval_crop_fraction = 0.875  # Unstated: resize 256, center crop 224.
  config.normalization_mean = (0.485, 0.456, 0.406)
  config.normalization_std = (0.229, 0.224, 0.225)
  config.data_workers = 16
  config.data_threads = 8
  config.compute_dtype = "bfloat16"  # Parameters stay float32.

  config.batch_size = 4096  # Paper.
  config.eval_batch_size = 4096
  config.num_epochs = 130.0  # Paper: 130 epochs (40,662 steps at batch 4096).

  config.optimizer = "sgd"  # Paper: Nesterov momentum SGD.
  config.nesterov = True  # Paper.
  config.momentum = 0.9  # Unstated.
  config.base_learning_rate = 0.1  # Paper: 1.6 at batch 4096, i.e. 0.1 per 256 images.
  config.lr_schedule = "cosine"  # Paper.
  config.warmup_epochs = 10.0  # Paper.
  config.weight_decay = 1e-4  # Unstated; not on BatchNorm/bias.
  config.label_smoothing = 0.1  # Unstated.
  config.ema_decay = 0.9999  # Paper; constant (ema_warmup=False), as stated.

  config.log_every_steps = 100
  config.eval_every_epochs = 10.0
  config.checkpoint_every_epochs = 2.0
  config.max_to_keep = 3
  return config
