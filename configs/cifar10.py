"""CIFAR-10 (TFDS `cifar10`): SASA ResNet-26 and its convolutional baseline.

    python train.py --config=configs/cifar10.py                    # SASA ResNet-26
    python train.py --config=configs/cifar10.py:resnet26_cifar     # conv baseline
    python train.py --config=configs/cifar10.py:sasa_resnet26_conv_stem_cifar

The paper reports no CIFAR results; this is the common CIFAR ResNet recipe: SGD +
Nesterov 0.9, LR 0.1 at batch 128 (0.2 per 256 images, scaled linearly with the batch),
5 warm-up epochs then cosine, weight decay 5e-4 off BN/bias, pad-4 random crop + flip,
200 epochs. The models are the small-input variants of the ImageNet ones (a 3x3,
stride-1 stem and no stem pooling).
"""

from configs import default

MODELS = ("sasa_resnet26_cifar", "sasa_resnet26_conv_stem_cifar", "resnet26_cifar")


def get_config(model: str = "sasa_resnet26_cifar"):
  """CIFAR-10 config; `model` is chosen with `--config=configs/cifar10.py:<model>`."""
  config = default.for_model(model, MODELS, "cifar10.py")

  config.dataset = "cifar10"
  config.train_split = "train"
  config.eval_split = "test"
  config.image_size = 32
  config.augmentation = "cifar"
  config.eval_preprocessing = "none"
  config.normalization_mean = (0.4914, 0.4822, 0.4465)
  config.normalization_std = (0.2470, 0.2435, 0.2616)
  config.data_workers = 4
  config.data_threads = 4

  config.batch_size = 128
  config.eval_batch_size = 1000
  config.num_epochs = 200.0

  config.optimizer = "sgd"
  config.base_learning_rate = 0.2  # Per 256 images: 0.1 at batch 128.
  config.warmup_epochs = 5.0
  config.weight_decay = 5e-4
  config.label_smoothing = 0.0

  config.log_every_steps = 100
  config.eval_every_epochs = 10.0
  config.checkpoint_every_epochs = 5.0
  return config
