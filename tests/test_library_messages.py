"""Where the code reads a library's message text (the libraries give no type or attribute
to read instead), the reading is held against the installed version with a real failure."""

from __future__ import annotations

import tensorstore as ts

from sasa_jax.workdir import orbax_errors


def test_a_tensorstore_os_error_reads_as_its_cause_and_file(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": f"{blocker}/array/"}}
  try:
    ts.open(spec, create=True, dtype=ts.float32, shape=[4]).result()
  except ValueError as e:  # What TensorStore raises, with the spec appended.
    assert "tensorstore_spec" in str(e)
    error = RuntimeError("Orbax's wrapper")
    error.__cause__ = e
  assert orbax_errors.describe_error(error) == f"Not a directory ({blocker}/array)"


def test_any_other_error_reads_as_its_first_line():
  assert orbax_errors.describe_error(KeyError('Item "config" was not found.')) == (
      'Item "config" was not found')
  assert orbax_errors.describe_error(ValueError("first line.\nsecond line")) == "first line"
