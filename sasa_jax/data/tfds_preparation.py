"""Preparing TFDS datasets: finding the builder, downloading, writing ArrayRecord files.

:func:`tfds_builder` gives the builder of a dataset in a ``data_dir``, prepared as
ArrayRecord (the format random-access reading needs). An unprepared dataset is downloaded
and prepared when asked (``config.data_download``), and is otherwise a
:class:`~sasa_jax.errors.DatasetNotPreparedError` whose message says how to prepare it
(:func:`how_to_prepare`).

Preparing needs TensorFlow (the ``[data]`` extra); reading does not. What this module adds
to TFDS's own ``download_and_prepare``:

* a host that TFDS would download from and that does not answer fails in seconds, not
  after TFDS's 3.5 minutes of retries (:func:`_check_download_hosts`);
* a preparation that fails leaves ``data_dir`` as it was, finished downloads aside, which
  TFDS checks and reuses (:func:`_undone_on_failure`);
* a dataset folder without ``dataset_info.json`` (a copy or a preparation that did not
  finish) is an error naming it, not a confusing read failure.

From the command line: ``python -m sasa_jax.data prepare NAME --data_dir=DIR``.
"""

from __future__ import annotations

import contextlib
import difflib
import shutil
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

from sasa_jax.errors import ConfigError, DatasetNotPreparedError, MissingDependencyError

DIGITS = "digits"  # The embedded dataset, which is not a TFDS name.
FILE_FORMAT = "array_record"  # The format that random-access reading needs.
PREPARE_COMMAND = "python -m sasa_jax.data prepare"




def how_to_prepare(name: str, builder) -> str:
  """What every "not prepared" error ends with: the command, and where files go."""
  manual = "DIR/downloads/manual (or --manual_dir)"
  files = sorted({i.filename for i in (builder.url_infos or {}).values() if i.filename})
  instructions = " ".join(str(builder.MANUAL_DOWNLOAD_INSTRUCTIONS or "").split())
  instructions = instructions.rstrip(".")
  if instructions:
    where = (f"This dataset needs a manual download: put its files in {manual} first "
             f"({instructions}); the command then needs no network.")
  elif files:
    hosts = sorted({urllib.parse.urlsplit(u).netloc for u in builder.url_infos})
    them = "that file" if len(files) == 1 else "those files"
    where = (f"It downloads {', '.join(files)} from {', '.join(hosts)}; without "
             f"network, put {them} in {manual} first, or prepare DIR on a machine "
             f"with network and copy it here.")
  else:
    where = ("It downloads the dataset's files; without network, prepare DIR on a "
             "machine with network and copy it here.")
  return (
      f"To prepare it:\n"
      f"    pip install -e \".[data]\"   # preparing needs TensorFlow; reading does not\n"
      f"    {PREPARE_COMMAND} {name} --data_dir=DIR\n"
      f"and train with --config.data_dir=DIR (now: {builder.data_dir_root}). {where} "
      f"See https://www.tensorflow.org/datasets/catalog/{builder.name}.")


def _not_prepared(name: str, builder, why: str = "") -> DatasetNotPreparedError:
  return DatasetNotPreparedError(
      f"Dataset {name!r} is not prepared in data_dir="
      f"{str(builder.data_dir_root)!r}{why}.\n" + how_to_prepare(name, builder))


def tfds_builder(name: str, data_dir: str | None, *, prepare: bool,
                 manual_dir: str | None = None):
  """The TFDS builder of ``name`` in ``data_dir``, prepared as ArrayRecord.

  An unprepared dataset is downloaded and prepared when ``prepare`` (TFDS uses the
  files it finds in ``manual_dir``, default ``data_dir/downloads/manual``, instead of
  downloading them), and is a :class:`DatasetNotPreparedError` saying how to prepare
  it otherwise. An unknown name is a ``ConfigError`` suggesting close names.
  """
  builder = _registered_builder(name, data_dir)
  if not _is_prepared(name, builder):
    if not prepare:
      raise _not_prepared(name, builder)
    _download_and_prepare(name, builder, manual_dir)
  file_format = str(builder.info.file_format).lower()
  if FILE_FORMAT not in file_format:
    raise DatasetNotPreparedError(
        f"Dataset {name!r} in {builder.data_dir} is stored as {file_format}, but "
        f"random-access reading needs ArrayRecord. Delete that folder (or choose "
        f"another data_dir) and run "
        f"`{PREPARE_COMMAND} {name} --data_dir=DIR`.")
  return builder


def _registered_builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.DatasetNotFoundError as e:
    close = difflib.get_close_matches(name, [DIGITS, *tfds.list_builders()], n=3)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ConfigError(
        f"Unknown config.dataset={name!r}: it is neither {DIGITS!r} (the embedded "
        f"scikit-learn digits) nor a TFDS dataset (registered, or prepared in "
        f"data_dir={data_dir!r}).{hint}"
    ) from e


def _is_prepared(name: str, builder) -> bool:
  """Whether the builder's version folder holds a prepared dataset.

  A folder without ``dataset_info.json`` (a preparation or a copy that did not
  finish) is an error: TFDS would take it for a prepared dataset and fail to read it.
  """
  path = builder.data_path
  if not path.exists():
    return False
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"{path} exists but holds no prepared dataset (it has no dataset_info.json): "
        f"what is left of a preparation or a copy that did not finish. Delete it "
        f"(rm -r {path}) and prepare the dataset again.\n"
        + how_to_prepare(name, builder))
  return True


def _download_and_prepare(name: str, builder, manual_dir: str | None) -> None:
  """Downloads and prepares ``builder`` as ArrayRecord, or raises a clear error."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  download_dir = Path(builder.data_dir_root) / "downloads"
  _check_download_hosts(name, builder,
                        Path(manual_dir) if manual_dir else download_dir / "manual")
  config = tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=manual_dir)
  try:
    with _undone_on_failure(builder, download_dir):
      builder.download_and_prepare(file_format=FILE_FORMAT, download_dir=download_dir,
                                   download_config=config)
  except ImportError as e:
    module = _missing_module(e)
    hint = ("pip install -e \".[data]\"" if module.startswith("tensorflow")
            else "install the package that provides it")
    raise MissingDependencyError(
        f"Preparing dataset {name!r} needs the Python module {module!r}, which is "
        f"not installed: {hint}.") from e
  except Exception as e:  # pylint: disable=broad-except
    raise _not_prepared(name, builder, f" and could not be downloaded and prepared "
                        f"({_describe(e)})") from e


def _missing_module(error: ImportError) -> str:
  """The module that failed to import (TFDS re-raises it, unnamed, around encoding)."""
  cause: BaseException | None = error
  while cause is not None:
    if isinstance(cause, ImportError) and cause.name:
      return cause.name
    cause = cause.__cause__ or cause.__context__
  return str(error)


def _describe(error: BaseException, head: int = 200, tail: int = 300) -> str:
  """``Type: message``, long messages cut in the middle (TFDS puts the reason last)."""
  text = str(error).strip()
  if len(text) > head + tail:
    text = f"{text[:head]} [...] {text[-tail:]}"
  return f"{type(error).__name__}: {text}"


PROBE_TIMEOUT_S = 10.0


def _check_download_hosts(name: str, builder, manual_dir: Path) -> None:
  """Fails in seconds when a host that TFDS would download from does not answer.

  TFDS retries a failed connection ten times with exponential back-off (about 3.5
  minutes) before it gives up. One request per host, without retries, tells at once.
  The URLs are the builder's registered ones, less the files found in ``manual_dir``
  (TFDS takes those instead of downloading them). Manual-download datasets (e.g.
  imagenet2012) and builders without registered URLs are not checked. The request
  goes through ``requests``, as TFDS's downloads do, so it takes the same proxies
  (``HTTPS_PROXY``, ...).
  """
  import requests  # pylint: disable=g-import-not-at-top

  if builder.MANUAL_DOWNLOAD_INSTRUCTIONS:
    return
  hosts: dict[str, str] = {}  # host -> one of its URLs
  for url, info in (builder.url_infos or {}).items():
    if info.filename and (manual_dir / info.filename).exists():
      continue
    parts = urllib.parse.urlsplit(url)
    if parts.scheme in ("http", "https"):
      hosts.setdefault(parts.netloc, url)
  for host, url in sorted(hosts.items()):
    try:
      requests.head(url, timeout=PROBE_TIMEOUT_S, allow_redirects=False)
    except requests.RequestException as e:
      raise _not_prepared(name, builder, f", and its files cannot be downloaded here: "
                          f"{host} does not answer ({_describe(e)})") from e


def _is_temporary(path: Path) -> bool:
  """TFDS's temporaries: ``*.tmp.<uuid>`` downloads, ``incomplete.*`` folders."""
  return ".tmp." in path.name or path.name.startswith("incomplete.")


@contextlib.contextmanager
def _undone_on_failure(builder, download_dir: Path) -> Iterator[None]:
  """Removes what a failed preparation wrote, except finished downloads.

  TFDS writes the dataset into an ``incomplete.*`` folder that it renames when done
  (and removes on an exception) and downloads into ``*.tmp.*`` folders; a failure
  still leaves the dataset's folders, the download folders and the temporaries of an
  interrupted download. On any exception this removes the temporaries that appeared
  and every folder that did not exist before (the dataset's with all it holds, the
  download folders once empty), so that ``data_dir`` is as it was, plus any finished
  download (TFDS checks those against their checksums and reuses them).
  """
  root = Path(builder.data_dir_root)
  parts = Path(builder.data_dir).relative_to(root).parts  # name[/config]/version
  dataset_dirs = [root.joinpath(*parts[:i]) for i in range(1, len(parts))]
  download_dirs = [download_dir, download_dir / builder.name, download_dir / "extracted"]
  watched = [root, *dataset_dirs, *download_dirs]
  before = {d: set(d.iterdir()) if d.is_dir() else None for d in watched}
  try:
    yield
  except BaseException:
    for d in reversed(watched):  # Deepest first: a folder empties before its parent.
      if not d.is_dir():
        continue
      if before[d] is None and d in dataset_dirs:
        shutil.rmtree(d)
        continue
      for entry in set(d.iterdir()) - (before[d] or set()):
        if _is_temporary(entry) and entry.is_dir():
          shutil.rmtree(entry)
        elif _is_temporary(entry):
          entry.unlink()
      if before[d] is None and not any(d.iterdir()):
        d.rmdir()
    raise
