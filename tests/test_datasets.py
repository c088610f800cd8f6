"""Datasets: the embedded digits, real Fashion-MNIST through the config keys, and
preparing TFDS datasets: the command, the manual dir, failing fast offline, and
leaving nothing behind when a preparation fails."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import MANUAL_FILE, REPO, run_train_py

from sasa_jax import data
from sasa_jax.data import __main__ as data_main
from sasa_jax.data import pipeline as ip
from sasa_jax.data import tfds_preparation
from sasa_jax.errors import ConfigError, DatasetNotPreparedError, MissingDependencyError

SHARED_TFDS = REPO.parent / "shared" / "data" / "tfds"


def _tree(path):
  """Every path under ``path`` (relative), to compare a folder before and after."""
  return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def _write_manual_file(manual_dir, num_examples=12, max_label=1):
  """Real 0/1 digits (scikit-learn) as sasa_test_manual's manual download."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  digits = load_digits()
  keep = np.flatnonzero(digits.target <= 1)[:num_examples]
  images = (digits.images[keep] * 15).astype(np.uint8)[..., None]
  labels = np.minimum(digits.target[keep], max_label)
  labels[-1] = max_label
  manual_dir.mkdir(parents=True, exist_ok=True)
  np.savez(manual_dir / MANUAL_FILE, images=images, labels=labels)
  return images, labels


@pytest.fixture
def offline(monkeypatch):
  """No host answers: every HTTP(S) request goes to a proxy that refuses connections
  (a bound, never listening port), in this process and in its children."""
  with socket.socket() as closed:
    closed.bind(("127.0.0.1", 0))
    proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
    for key in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
      monkeypatch.setenv(key, proxy)
    for key in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
      monkeypatch.delenv(key, raising=False)
    yield


def test_digits_splits_are_disjoint_real_digits(make_config):
  train, test = data.DigitsSource("train"), data.DigitsSource("test")
  assert (len(train), len(test)) == (1437, 360)
  ex = train[0]
  assert ex["image"].shape == (8, 8, 1) and ex["image"].dtype == np.uint8
  assert ex["image"].max() <= 240
  train_images = {train[i]["image"].tobytes() for i in range(len(train))}
  test_images = [test[i]["image"].tobytes() for i in range(len(test))]
  # load_digits has a few duplicate images; the index split keeps them rare.
  assert sum(t in train_images for t in test_images) < 10
  assert sorted({int(test[i]["label"]) for i in range(len(test))}) == list(range(10))
  info = data.open_dataset(make_config()).info
  assert (info.num_classes, info.num_channels) == (10, 1)
  with pytest.raises(ConfigError, match="splits"):
    data.DigitsSource("validation")


def test_fashion_mnist_through_the_config_keys(make_config):
  """The real Fashion-MNIST (TFDS ArrayRecord) read with ``dataset`` and ``data_dir``."""
  if not (SHARED_TFDS / "fashion_mnist").is_dir():
    pytest.skip(f"Fashion-MNIST is not in {SHARED_TFDS}")
  config = make_config(dataset="fashion_mnist", data_dir=str(SHARED_TFDS),
                       image_size=28, batch_size=32, augmentation="cifar")
  info = data.open_dataset(config).info
  assert info == data.DatasetInfo("fashion_mnist", num_classes=10,
                                  num_train_examples=60_000, num_eval_examples=10_000,
                                  num_channels=1, image_size=(28, 28))
  source = data.open_dataset(config).source("test")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  direct = tfds.data_source("fashion_mnist", data_dir=str(SHARED_TFDS), split="test")
  for i in (0, 9_999):
    np.testing.assert_array_equal(source[i]["image"], direct[i]["image"])
    assert source[i]["label"] == direct[i]["label"]
  batch = next(ip.train_iterator(data.open_dataset(config).source("train"), config))
  assert batch["image"].shape == (32, 28, 28, 1) and batch["image"].dtype == np.uint8
  assert batch["image"].std() > 10  # Photographs, not padding.
  assert len(set(batch["label"].tolist())) > 3


def test_unknown_dataset_is_a_clear_error(make_config, tmp_path):
  with pytest.raises(ConfigError, match="Unknown config.dataset='cifar_10'.*cifar10"):
    data.open_dataset(make_config(dataset="cifar_10", data_dir=str(tmp_path)))


def test_unprepared_dataset_says_how_to_prepare_it_and_leaves_nothing(
    make_config, manual_tfds_builder, tmp_path):
  data_dir = tmp_path / "tfds"
  config = make_config(dataset=manual_tfds_builder, data_dir=str(data_dir))
  with pytest.raises(DatasetNotPreparedError) as err:
    data.open_dataset(config).info  # Tries to prepare: the manual file is missing.
  message = str(err.value)
  assert "could not be downloaded" in message and MANUAL_FILE in message
  assert (f"python -m sasa_jax.data prepare {manual_tfds_builder} --data_dir=DIR"
          in message)
  assert "DIR/downloads/manual" in message
  assert not data_dir.exists()  # TFDS had made its folders; all removed.
  config.data_download = False
  with pytest.raises(DatasetNotPreparedError, match="is not prepared") as err:
    data.open_dataset(config).info
  assert "could not be downloaded" not in str(err.value)


def test_failed_preparation_leaves_the_data_dir_as_it_was(manual_tfds_builder,
                                                          tmp_path):
  """A preparation that fails half-way through writing the dataset."""
  data_dir = tmp_path / "tfds"
  _write_manual_file(data_dir / "downloads" / "manual", max_label=5)  # 5: no class.
  (data_dir / "other_dataset").mkdir()
  before = _tree(data_dir)
  with pytest.raises(DatasetNotPreparedError, match="(?s)could not be downloaded and "
                     "prepared.*Class label 5 greater than configured num_classes 2"):
    tfds_preparation.tfds_builder(manual_tfds_builder, str(data_dir), prepare=True)
  assert _tree(data_dir) == before


def test_cifar10_takes_its_archive_from_the_manual_dir(tmp_path, offline):
  """Offline, TFDS's own cifar10 builder reads the archive put in the manual dir
  instead of downloading it, and checks it: a wrong file is a clear error, and the
  failed preparation leaves the data_dir as it was."""
  manual_dir = tmp_path / "downloads" / "manual"
  manual_dir.mkdir(parents=True)
  (manual_dir / "cifar-10-binary.tar.gz").write_bytes(b"not the CIFAR-10 archive")
  before = _tree(tmp_path)
  with pytest.raises(DatasetNotPreparedError,
                     match="NonMatchingChecksumError.*downloads/manual/cifar-10-binary"):
    tfds_preparation.tfds_builder("cifar10", str(tmp_path), prepare=True)
  assert _tree(tmp_path) == before


def test_prepare_command_reads_the_manual_dir(make_config, manual_tfds_builder,
                                              tmp_path, offline, capsys):
  data_dir, manual_dir = tmp_path / "tfds", tmp_path / "archives"
  images, labels = _write_manual_file(manual_dir)
  assert data_main.main(["prepare", manual_tfds_builder, f"--data_dir={data_dir}",
                        f"--manual_dir={manual_dir}"]) == 0
  out = capsys.readouterr().out
  assert f"{manual_tfds_builder}/1.0.0 is prepared in" in out and "train 12" in out
  config = make_config(dataset=manual_tfds_builder, data_dir=str(data_dir),
                       data_download=False, eval_split="train")
  info = data.open_dataset(config).info
  assert (info.num_classes, info.num_train_examples, info.num_channels) == (2, 12, 1)
  source = data.open_dataset(config).source("train")
  got = sorted((int(source[i]["label"]), source[i]["image"].tobytes())
               for i in range(len(source)))
  assert got == sorted((int(l), im.tobytes()) for im, l in zip(images, labels))
  # Run again: it is prepared, nothing to do.
  assert data_main.main(["prepare", manual_tfds_builder, f"--data_dir={data_dir}"]) == 0


def test_half_made_dataset_folder_is_a_clear_error(make_config, tiny_tfds_dir,
                                                   tmp_path):
  """A copy that stopped before dataset_info.json: TFDS alone would take the folder
  for a prepared dataset and fail to read it."""
  import shutil  # pylint: disable=g-import-not-at-top

  data_dir = tmp_path / "tfds"
  shutil.copytree(tiny_tfds_dir, data_dir)
  version_dir = data_dir / "sasa_test_digits" / "1.0.0"
  (version_dir / "dataset_info.json").unlink()
  config = make_config(dataset="sasa_test_digits", data_dir=str(data_dir))
  with pytest.raises(DatasetNotPreparedError,
                     match=f"{version_dir} exists but holds no prepared dataset.*"
                     f"rm -r {version_dir}"):
    data.open_dataset(config).info
  assert version_dir.is_dir()  # Never deleted for the user: it may be a copy under way.


def test_a_missing_module_is_not_reported_as_a_download_failure(
    needs_module_tfds_builder, tmp_path):
  with pytest.raises(MissingDependencyError,
                     match="needs the Python module 'sasa_test_module_that_is_not_"
                     "installed', which is not installed") as err:
    tfds_preparation.tfds_builder(needs_module_tfds_builder, str(tmp_path), prepare=True)
  assert "download" not in str(err.value)
  assert not any(tmp_path.iterdir())


def test_offline_the_prepare_command_fails_fast(tmp_path, offline, capsys):
  start = time.monotonic()
  assert data_main.main(["prepare", "cifar10", f"--data_dir={tmp_path}"]) == 1
  assert time.monotonic() - start < 2 * tfds_preparation.PROBE_TIMEOUT_S
  err = capsys.readouterr().err
  assert "www.cs.toronto.edu does not answer" in err
  assert "python -m sasa_jax.data prepare cifar10 --data_dir=DIR" in err
  assert not any(tmp_path.iterdir())


def test_offline_train_py_fails_fast_with_how_to_prepare(tmp_path, offline):
  """The README's CIFAR-10 command on a machine that reaches no dataset host."""
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()
  start = time.monotonic()
  result = run_train_py("--config=configs/cifar10.py", f"--config.data_dir={data_dir}",
                        f"--workdir={tmp_path / 'run'}", timeout=120)
  elapsed = time.monotonic() - start
  assert result.returncode == 1, result.stderr[-3000:]
  assert "www.cs.toronto.edu does not answer" in result.stderr
  assert "python -m sasa_jax.data prepare cifar10 --data_dir=DIR" in result.stderr
  assert "Traceback" not in result.stderr
  assert not any(data_dir.iterdir())
  assert elapsed < 60, elapsed  # TFDS's own retries take 3.5 minutes.


def test_python_m_runs_the_command(tmp_path):
  result = subprocess.run([sys.executable, "-m", "sasa_jax.data", "--help"],
                          cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=False)
  assert result.returncode == 0 and "prepare" in result.stdout
