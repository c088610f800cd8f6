"""Shared fixtures: tiny training configs and a tiny TFDS dataset built locally."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `from configs import default`, as train.py does.
  sys.path.insert(0, str(REPO))

# The tests run on the CPU (their own processes too). It is JAX's default here, but the
# test extra installs libtpu (to compile for TPU without one), with which JAX would
# otherwise look for a TPU in every process and print its failure.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The TPU tests load libtpu in each pytest-xdist worker: by default a second process that
# loads it stops on libtpu's lock file (a guard for processes sharing a real TPU).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The tests compile hundreds of small programs and run each a few times: without LLVM's
# optimisations XLA compiles them in about 60% of the time, and without the CPU backend's
# fusion emitters (the loop emitters instead) in another 45% (14 programs of the op tests:
# 8.4 s -> 3.7 s). The results are the same functions; tolerances cover the rounding of
# another instruction order. Set before JAX starts, here and in the processes the tests
# start.
os.environ["XLA_FLAGS"] = " ".join(
    (os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
     "--xla_cpu_use_fusion_emitters=false")).strip()


# One persistent XLA compilation cache for the whole run: every pytest-xdist worker and
# every process the tests start (they inherit this environment) read and write it. The
# tests compile the same programs many times over (a run, its resumption and its
# evaluation): a tiny train.py took 6.0 s with its programs cached, 7.2 s without.
# Only programs that take a while to compile are kept (not the thousands of small ones
# that eager operations compile, which would cost more to store than to compile). The
# cache's size limit turns on its file lock, which the processes sharing it need. Made
# by the first process to load this file (xdist's controller), removed by it at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ.update(JAX_COMPILATION_CACHE_DIR=tempfile.mkdtemp(prefix="sasa_jax_xla_cache_"),
                    JAX_COMPILATION_CACHE_MAX_SIZE=str(8 * 2**30),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def pytest_configure(config):
  """Float32 matmuls at full precision: GPUs default to TF32 (~1e-3 relative), which the
  1e-5 tolerances of the implementation-vs-reference tests are not meant to absorb. No
  effect on CPU."""
  del config
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """The slow tests first: pytest-xdist hands the tests out in this order, so the longest
  ones start while there is work left for the other workers, rather than running alone
  at the end."""
  del config
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


TINY_TFDS_NAME = "sasa_test_digits"
TINY_TFDS_SPLITS = {"train": (0, 96), "test": (96, 136)}
MANUAL_FILE = "sasa_test_manual.npz"  # What sasa_test_manual reads from its manual dir.


def tiny_config(model_overrides=None, **overrides):
  """configs/default.py shrunk to a few steps of a narrower ``sasa_tiny``;
  ``model_overrides`` (a dict) updates ``config.model_overrides``."""
  from configs import default  # pylint: disable=g-import-not-at-top

  config = default.get_config()
  config.model_overrides.update({"width": 8, **(model_overrides or {})})
  config.update(batch_size=16, eval_batch_size=120, num_train_steps=4,
                warmup_steps=1, log_every_steps=2, eval_every_steps=4,
                checkpoint_every_steps=2)
  config.update(overrides)
  return config


@pytest.fixture
def make_config():
  """``make_config(**overrides)``: a tiny config (see :func:`tiny_config`)."""
  return tiny_config


def xla_flags(num_devices: int) -> str:
  """This process's XLA_FLAGS with ``num_devices`` CPU devices, for a child process."""
  return f"{os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count={num_devices}"


def subprocess_env(**extra: str) -> dict[str, str]:
  """The environment for a child Python: this one (with the compilation cache), plus
  ``extra``."""
  return {**os.environ, **extra}


def run_train_py(*args: str, cwd: str | Path = REPO,
                 timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs ``python train.py ARGS`` (in ``cwd``); captures its output."""
  return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd,
                        env=subprocess_env(), capture_output=True,
                        text=True, timeout=timeout, check=False)


def _tiny_builder_classes():
  """The test's TFDS builders (defined once: TFDS registers classes by name)."""
  if "classes" in _tiny_builder_classes.__dict__:
    return _tiny_builder_classes.classes
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  class SasaTestDigits(tfds.core.GeneratorBasedBuilder):
    """136 real 8x8 handwritten digits (scikit-learn) as PNGs, in two splits."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(8, 8, 1)),
              "label": tfds.features.ClassLabel(num_classes=10),
          }),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(*bounds)
              for split, bounds in TINY_TFDS_SPLITS.items()}

    def _generate_examples(self, lo, hi):
      digits = load_digits()
      for i in range(lo, hi):
        yield i, {"image": (digits.images[i] * 15).astype(np.uint8)[..., None],
                  "label": int(digits.target[i])}

  class SasaTestManual(tfds.core.GeneratorBasedBuilder):
    """A dataset that needs a manual download (like imagenet2012): its examples are
    read from ``MANUAL_FILE`` (``images`` uint8 (N, 8, 8, 1), ``labels`` (N,), saved
    with ``np.savez``) in the manual dir."""

    VERSION = tfds.core.Version("1.0.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Put {MANUAL_FILE} in the manual dir."

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(8, 8, 1)),
              "label": tfds.features.ClassLabel(num_classes=2),
          }))

    def _split_generators(self, dl_manager):
      path = dl_manager.manual_dir / MANUAL_FILE
      if not path.exists():
        raise AssertionError(f"{path} not found. {self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
      return {"train": self._generate_examples(path)}

    def _generate_examples(self, path):
      with np.load(path) as arrays:
        for i, (image, label) in enumerate(zip(arrays["images"], arrays["labels"])):
          yield i, {"image": image, "label": int(label)}

  class SasaTestNeedsModule(tfds.core.GeneratorBasedBuilder):
    """A dataset whose preparation imports a module that is not installed."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"label": tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      import sasa_test_module_that_is_not_installed  # noqa: F401  # pylint: disable=g-import-not-at-top,unused-import
      return {}

    def _generate_examples(self):
      yield from ()

  _tiny_builder_classes.classes = (SasaTestDigits, SasaTestManual, SasaTestNeedsModule)
  return _tiny_builder_classes.classes


@pytest.fixture(scope="session")
def tiny_tfds_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding ``sasa_test_digits`` prepared as ArrayRecord.

  Building needs TensorFlow (the ``[data]`` extra); reading does not.
  """
  pytest.importorskip("tensorflow")
  data_dir = tmp_path_factory.mktemp("tfds")
  builder_cls = _tiny_builder_classes()[0]
  builder_cls(data_dir=str(data_dir)).download_and_prepare(file_format="array_record")
  return str(data_dir)


@pytest.fixture(scope="session")
def manual_tfds_builder() -> str:
  """The name of a registered TFDS dataset that needs a manual download
  (:data:`MANUAL_FILE`)."""
  pytest.importorskip("tensorflow")
  _tiny_builder_classes()
  return "sasa_test_manual"


@pytest.fixture(scope="session")
def needs_module_tfds_builder() -> str:
  """The name of a registered TFDS dataset whose preparation needs a missing module."""
  _tiny_builder_classes()
  return "sasa_test_needs_module"
