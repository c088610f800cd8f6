"""Prepares a TFDS dataset ahead of training (ArrayRecord files), e.g. for a machine without
network::

    python -m sasa_jax.data prepare NAME [--data_dir=DIR] [--manual_dir=DIR]

then ``python train.py ... --config.data_dir=DIR``. ``NAME`` is a TFDS name (``cifar10``,
``imagenet2012``, ``fashion_mnist``; ``name:version`` and ``name/config`` work too). The
flags are absl flags, as ``train.py``'s, parsed into their own ``FlagValues`` so that
``main`` can be called from Python too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from absl import flags

from sasa_jax.data import tfds_preparation
from sasa_jax.errors import Error

USAGE = (f"usage: {tfds_preparation.PREPARE_COMMAND} NAME [--data_dir=DIR] "
         f"[--manual_dir=DIR]")


def _flag_values() -> flags.FlagValues:
  values = flags.FlagValues()
  flags.DEFINE_string("data_dir", None, "The TFDS data_dir to prepare it in (default: "
                      "TFDS's, ~/tensorflow_datasets); train with --config.data_dir=DIR.",
                      flag_values=values)
  flags.DEFINE_string("manual_dir", None, "Files to use instead of downloading them "
                      "(default: DATA_DIR/downloads/manual).", flag_values=values)
  return values


def main(argv: Sequence[str]) -> int:
  """Runs the command on ``argv`` (without the program name); returns the exit status."""
  values = _flag_values()
  if "--help" in argv or "-h" in argv:
    print(f"{__doc__}\n{USAGE}\n\n{values.get_help()}")
    return 0
  try:
    rest = values(["sasa_jax.data", *argv])[1:]
  except flags.Error as e:
    print(f"error: {e}\n{USAGE}", file=sys.stderr)
    return 2
  if len(rest) != 2 or rest[0] != "prepare":
    print(f"error: expected `prepare NAME`; got {' '.join(rest) or 'nothing'}.\n{USAGE}",
          file=sys.stderr)
    return 2
  try:
    builder = tfds_preparation.tfds_builder(rest[1], values.data_dir, prepare=True,
                                            manual_dir=values.manual_dir)
  except Error as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  splits = ", ".join(f"{name} {split.num_examples:,}"
                     for name, split in sorted(builder.info.splits.items()))
  print(f"{builder.info.full_name} is prepared in {builder.data_dir} "
        f"({tfds_preparation.FILE_FORMAT}; {splits} examples).")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
