"""The notebooks in colab/: committed clean, linked from the README, and executed top to
bottom (nbclient, a local Jupyter kernel on CPU); any cell error fails the test."""

from __future__ import annotations

import re
import time
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "colab").glob("*.ipynb"))
COLAB_URL = "https://colab.research.google.com/github/sasa-jax/sasa_jax/blob/main/"
# Each cell may take this long before nbclient stops it (a hung cell, not a slow one: the
# tour takes about 1.5 minutes on 2 CPU cores; its time is recorded, not asserted).
CELL_TIMEOUT_S = 300

ids = [path.name for path in NOTEBOOKS]


def test_there_are_notebooks():
  assert any(path.name == "sasa_tour.ipynb" for path in NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_is_committed_clean_and_installs_only_in_colab(path):
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert code
  for cell in code:
    assert not cell.outputs and cell.execution_count is None, (
        f"{path.name} is committed with outputs: clear them (Jupyter: 'Clear All Outputs'; "
        f"or `jupyter nbconvert --clear-output --inplace {path.relative_to(REPO)}`).")
  # Installing is for Colab only: a local run uses the checkout it is in.
  for cell in code:
    if re.search(r"pip\b.*\binstall", cell.source):
      assert "IN_COLAB" in cell.source and '"google.colab" in sys.modules' in cell.source
  # The notebook links itself in Colab.
  first = nb.cells[0]
  assert first.cell_type == "markdown"
  assert COLAB_URL + str(path.relative_to(REPO)) in first.source


def test_readme_has_an_open_in_colab_badge_for_every_notebook():
  readme = (REPO / "README.md").read_text()
  section = readme[readme.index("## Colab"):]
  for path in NOTEBOOKS:
    url = COLAB_URL + str(path.relative_to(REPO))
    assert f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})" \
        in section, path.name


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_runs_top_to_bottom(path, tmp_path, monkeypatch, record_property):
  from nbclient import NotebookClient  # pylint: disable=g-import-not-at-top

  # The kernel inherits this environment: every directory the notebook creates (its
  # checkpoint workdir, tempfile's) is under tmp_path.
  monkeypatch.setenv("SASA_TOUR_WORKDIR", str(tmp_path / "workdir"))
  monkeypatch.setenv("TMPDIR", str(tmp_path))
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(
      nb, timeout=CELL_TIMEOUT_S, startup_timeout=120, kernel_name="python3",
      # The working directory is the notebook's folder, as in Jupyter.
      resources={"metadata": {"path": str(path.parent)}})
  start = time.perf_counter()
  try:
    client.execute()  # Raises CellExecutionError (with the traceback) on any cell error.
  finally:
    elapsed = time.perf_counter() - start
    record_property("execution_seconds", round(elapsed, 1))
    print(f"{path.name}: executed in {elapsed:.1f} s")
    nbformat.write(nb, tmp_path / path.name)  # What ran, for a look after a failure.
  errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if out.output_type == "error"]
  assert not errors
