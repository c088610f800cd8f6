"""CIFAR-10 (TFDS `cifar10`): SASA ResNet-26 and its convolutional baseline.

    python train.py --config=configs/cifar10.py                    # SASA ResNet-26
    python train.py --config=configs/cifar10.py:resnet26_cifar     # conv baseline
    python train.py --config=configs/cifar10.py:sasa_resnet26_conv_stem_cifar

The paper reports no CIFAR results; this is the common CIFAR ResNet recipe
(SGD + Nesterov 0.9, LR 0.1 at batch 128, 5 warm-up epochs then cosine, weight decay
5e-4 off BN/bias, pad-4 random crop + flip), 200 epochs. The models are the
small-input variants of the ImageNet ones (a 3x3, stride-1 stem and no stem pooling).
"""

from configs import default

MODELS = ("sasa_resnet26_cifar", "sasa_resnet26_conv_stem_cifar", "resnet26_cifar")
NUM_TRAIN_EXAMPLES = 50_000


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
  steps_per_epoch = NUM_TRAIN_EXAMPLES // config.batch_size
  config.num_train_steps = 200 * steps_per_epoch

  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.warmup_steps = 5 * steps_per_epoch
  config.weight_decay = 5e-4
  config.label_smoothing = 0.0

  config.log_every_steps = 100
  config.eval_every_steps = 10 * steps_per_epoch
  config.checkpoint_every_steps = 5 * steps_per_epoch
  return config
