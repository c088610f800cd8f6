"""Multi-host training with real processes on localhost, joined by jax.distributed the way
the README's recipe does it (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID):
2 processes x 2 CPU devices train, resume and evaluate the run of 1 process x 4 devices;
each reads its own rows; a killed process stops the others; different configs are an
error on every process; incomplete settings are an error before anything is compiled."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import optax
import portpicker
import pytest
from conftest import REPO, subprocess_env, tiny_config, xla_flags

from experiments import report as sweep_report
from sasa_jax import training
from sasa_jax.data import pipeline as input_pipeline
from sasa_jax.distributed import settings
from sasa_jax.errors import ConfigError
from sasa_jax.workdir import layout
from sasa_jax.workdir.checkpointer import Checkpointer

# No run of these tests takes longer on 2 busy cores; then every process is killed.
_DEADLINE_SECONDS = 300
# A lost process must stop the others within this (the tests' --process_timeout_seconds).
_PROCESS_TIMEOUT = 10

# tests/conftest.py's tiny_config, as train.py overrides.
_TINY = ("--config.model_overrides.width=8", "--config.batch_size=16",
         "--config.eval_batch_size=120", "--config.warmup_steps=1")


class _Processes:
  """``python ARGS`` in ``num_processes`` processes of ``devices`` CPU devices each,
  joined through the JAX_* environment variables on a free localhost port; the output
  of process i goes to ``<tmp_path>/<name>.<i>.log``. Leaving the ``with`` block kills
  whatever still runs."""

  def __init__(self, tmp_path: Path, name: str, args, *, num_processes: int = 2,
               devices: int = 2, extra_args=None,
               environ=None):
    port = portpicker.pick_unused_port()
    self.logs = [tmp_path / f"{name}.{i}.log" for i in range(num_processes)]
    self.procs = []
    for i, log in enumerate(self.logs):
      env = subprocess_env(
          JAX_PLATFORMS="cpu",
          XLA_FLAGS=xla_flags(devices),
          JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
          **{"JAX_NUM_PROCESSES": str(num_processes), "JAX_PROCESS_ID": str(i),
             **(environ or {}).get(i, {})})
      with open(log, "w") as out:
        self.procs.append(subprocess.Popen(
            [sys.executable, *args, *(extra_args or {}).get(i, ())], cwd=REPO, env=env,
            stdout=out, stderr=subprocess.STDOUT))

  def output(self, i: int) -> str:
    return self.logs[i].read_text()

  def wait(self, timeout: float = _DEADLINE_SECONDS) -> list[int]:
    """The exit statuses; fails (and kills all) if one is still running at ``timeout``."""
    deadline = time.monotonic() + timeout
    for i, proc in enumerate(self.procs):
      try:
        proc.wait(max(0.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        self.kill()
        raise AssertionError(f"process {i} still ran after {timeout} s:\n"
                             + self.output(i)[-3000:]) from None
    return [p.returncode for p in self.procs]

  def ok(self, timeout: float = _DEADLINE_SECONDS) -> list[str]:
    """Every process's output, after checking that all of them succeeded."""
    codes = self.wait(timeout)
    for i, code in enumerate(codes):
      assert code == 0, f"process {i} exited with {code}:\n{self.output(i)[-3000:]}"
    return [self.output(i) for i in range(len(self.procs))]

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()

  def __enter__(self) -> "_Processes":
    return self

  def __exit__(self, *exc) -> None:
    self.kill()


def _train_py(tmp_path, name, *args, **kwargs) -> _Processes:
  return _Processes(tmp_path, name, (str(REPO / "train.py"), "--multihost", *args), **kwargs)


def _state(workdir, num_steps: int):
  experiment = training.Experiment(tiny_config(num_train_steps=num_steps), str(workdir))
  with Checkpointer(str(workdir), read_only=True) as checkpointer:
    return jax.device_get(checkpointer.restore_state(num_steps,
                                                     experiment.abstract_state()))


def _train_scalars(workdir) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """The run's ``train/*`` TensorBoard scalars, ``{tag: (steps, values)}`` (a resumed
  run's repeated steps counted once, as the sweep's report reads them)."""
  return {tag: series for tag, series in sweep_report.read_scalars(str(workdir)).items()
          if tag.startswith("train/") and "per_second" not in tag}


def _steps(workdir) -> list[int]:
  path = Path(workdir) / layout.CHECKPOINT_DIR
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if path.is_dir() else []


@pytest.mark.slow
def test_two_processes_train_the_run_of_one_through_a_kill_and_a_rerun(
    tmp_path):
  """2 x 2 devices: process 1 is killed with -9 after the first checkpoint, process 0
  stops within the timeout, the re-run resumes from the shared checkpoint and ends with
  the parameters, metrics and evaluation of the run in one process, to float32
  reduction noise (the devices sum in another order)."""
  num_steps, every = 20, 5
  workdir = tmp_path / "two"
  args = (f"--workdir={workdir}", *_TINY, f"--config.num_train_steps={num_steps}",
          f"--config.log_every_steps={every}", f"--config.checkpoint_every_steps={every}",
          f"--config.eval_every_steps={num_steps}",
          f"--process_timeout_seconds={_PROCESS_TIMEOUT}")
  # Process 1 reads with more threads: a host setting, not part of the run's config.
  host_setting = {1: ("--config.data_threads=3",)}

  with _train_py(tmp_path, "killed", *args,
                 extra_args=host_setting) as run:
    deadline = time.monotonic() + _DEADLINE_SECONDS
    while not _steps(workdir) and time.monotonic() < deadline:
      assert run.procs[0].poll() is None, run.output(0)[-3000:]
      time.sleep(0.02)
    assert _steps(workdir), f"no checkpoint in {_DEADLINE_SECONDS} s"
    run.procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes = run.wait()
    stopped_after = time.monotonic() - killed_at
  assert codes[1] == -signal.SIGKILL and codes[0] != 0, run.output(0)[-3000:]
  # JAX's heartbeat check stops the survivor after the timeout (+ slack for a loaded
  # machine); what it prints is JAX's own text.
  assert stopped_after < _PROCESS_TIMEOUT + 50
  interrupted_at = _steps(workdir)[-1]
  assert every <= interrupted_at < num_steps

  with _train_py(tmp_path, "rerun", *args, extra_args=host_setting) as run:
    rerun = run.ok()
  for out in rerun:
    assert f"Resuming from {workdir / 'checkpoints'} at step {interrupted_at}." in out
    assert "global batch 16 over 4 device(s) in 2 process(es)" in out
  with _train_py(tmp_path, "evaluate", f"--workdir={workdir}", "--mode=evaluate") as run:
    evaluated = run.ok()

  # The reference: the same run in this process, on its one device (the global batch
  # makes the device count invisible: tests/test_train_multidevice.py).
  reference = tmp_path / "one"
  ref_report = training.train_and_evaluate(
      tiny_config(num_train_steps=num_steps, log_every_steps=every,
                  checkpoint_every_steps=every, eval_every_steps=num_steps),
      str(reference))["eval"]
  ours, theirs = _state(workdir, num_steps), _state(reference, num_steps)
  ours, theirs = (ours.params, ours.batch_stats), (theirs.params, theirs.batch_stats)
  difference = jax.tree.map(lambda x, y: x - y, ours, theirs)
  assert optax.global_norm(difference) < 1e-4 * optax.global_norm(theirs)
  # The metrics the runs logged (the killed process may not have flushed its last
  # events; the re-run logged every step after the checkpoint it resumed from).
  two, one = _train_scalars(workdir), _train_scalars(reference)
  assert set(two) == set(one)
  for tag, (steps, values) in two.items():
    assert set(range(interrupted_at + every, num_steps + 1, every)) <= set(steps)
    want = dict(zip(*one[tag]))
    np.testing.assert_allclose(values, [want[s] for s in steps], rtol=1e-4, err_msg=tag)
  report = json.loads((workdir / layout.EVALUATION_FILE).read_text())
  assert report["step"] == num_steps
  assert report["num_examples"] == ref_report["num_examples"] == 360
  assert report["loss"] == pytest.approx(ref_report["loss"], rel=1e-5)
  assert report["accuracy"] == pytest.approx(ref_report["accuracy"], abs=1 / 360)

  # Process 0 alone prints and writes config.json, evaluation.json and TensorBoard (one
  # event file per training run); every process writes its part of each checkpoint.
  assert f"Trained sasa_tiny to step {num_steps}" in rerun[0] and "Trained" not in rerun[1]
  assert "Wrote" in evaluated[0] and "Wrote" not in evaluated[1]
  assert json.loads((workdir / layout.CONFIG_FILE).read_text())["data_threads"] == 1
  assert len(os.listdir(workdir / layout.TENSORBOARD_DIR)) == 2
  for step in _steps(workdir):
    state = workdir / layout.CHECKPOINT_DIR / str(step) / "state"
    assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(os.listdir(state))


@pytest.mark.slow
@pytest.mark.parametrize("environ, facts", [
    ({0: {"JAX_NUM_PROCESSES": "3"}},
     ("number of processes", "JAX_NUM_PROCESSES=3 on process 0", "JAX_NUM_PROCESSES=2")),
    ({1: {"JAX_NUM_PROCESSES": "3"}},
     ("number of processes", "JAX_NUM_PROCESSES=2 on process 0", "JAX_NUM_PROCESSES=3")),
    ({1: {"JAX_PROCESS_ID": "0"}}, ("process id 0", "JAX_PROCESS_ID=0", "0 to 1")),
], ids=["count 3 vs 2", "count 2 vs 3", "two processes 0"])
def test_processes_that_disagree_on_their_settings_all_stop_at_once(tmp_path, environ,
                                                                     facts):
  """Before jax.distributed starts (which would hang, abort in C++, or train unnoticed),
  every process stops with one line naming the setting that differs, and its values."""
  workdir = tmp_path / "run"
  with _train_py(tmp_path, "disagree", f"--workdir={workdir}", *_TINY,
                 environ=environ) as run:
    codes = run.wait(timeout=120)
  for i in (0, 1):
    out = run.output(i)
    assert codes[i] == 1, out[-3000:]
    (error,) = [line for line in out.splitlines() if line.startswith("train.py: error:")]
    for fact in facts:
      assert fact in error, error
    assert "Traceback" not in out and "Check failure" not in out
  assert not workdir.exists()  # Stopped before anything was built.


@pytest.mark.slow
def test_processes_with_different_configs_all_stop_naming_the_differences(tmp_path):
  workdir = tmp_path / "run"
  with _train_py(tmp_path, "different", f"--workdir={workdir}", *_TINY,
                 extra_args={1: ("--config.batch_size=32", "--config.data_threads=3")}
                 ) as run:
    codes = run.wait()
  for i in (0, 1):
    out = run.output(i)
    assert codes[i] == 1, out[-3000:]
    assert "The 2 processes were started with different configs:\n" in out
    assert "  batch_size: 16 on process 0, 32 on process 1\n" in out
    assert "data_threads" not in out.split("different configs:")[1].split("Start every")[0]
  assert not workdir.exists()  # Stopped before anything was built.


_ROWS_SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{repo!r}, {tests!r}]
    import numpy as np
    from sasa_jax.distributed import processes, settings
    processes.initialize(settings.settings())  # From the JAX_* variables.
    import jax
    from conftest import tiny_config
    from sasa_jax import data, training

    experiment = training.Experiment(tiny_config(), sys.argv[1])
    rows, images, labels = [], [], []
    with experiment.train_batches(0) as batches:
      for _ in range(3):
        shards = sorted(next(batches)["image"].addressable_shards,
                        key=lambda s: s.index[0].start)
        rows.append(np.concatenate([np.arange(16)[s.index[0]] for s in shards]))
        images.append(np.concatenate([np.asarray(s.data) for s in shards]))
    evals = [b["image"][b["mask"] > 0] for b in data.eval_iterator(
        experiment.dataset.source("test"), experiment.config, info=experiment.info)]
    np.savez(sys.argv[2], rows=np.stack(rows), images=np.stack(images),
             eval_images=np.concatenate(evals))
""")


@pytest.mark.slow
def test_each_process_reads_only_its_rows_of_every_global_batch(tmp_path):
  script = _ROWS_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests"))
  with _Processes(tmp_path, "rows", ("-c", script, str(tmp_path / "w")),
                  extra_args={i: (str(tmp_path / f"rows{i}.npz"),) for i in (0, 1)}
                  ) as run:
    run.ok()
  got = [np.load(tmp_path / f"rows{i}.npz") for i in (0, 1)]
  config = tiny_config()
  experiment = training.Experiment(config, str(tmp_path / "reference"))
  source = experiment.dataset.source(config.train_split)
  expected = input_pipeline.train_iterator(source, config, process_index=0,
                                           process_count=1)
  try:
    for step in range(3):
      batch = next(expected)
      rows = [g["rows"][step] for g in got]
      assert not set(rows[0]) & set(rows[1])
      assert sorted([*rows[0], *rows[1]]) == list(range(16))
      for g, r in zip(got, rows):
        np.testing.assert_array_equal(g["images"][step], batch["image"][r])
  finally:
    input_pipeline.close(expected)
  # Evaluation: each process reads a share of the split; together, all of it once.
  eval_source = experiment.dataset.source(config.eval_split)
  read = [image.tobytes() for g in got for image in g["eval_images"]]
  assert len(read) == len(eval_source) == 360
  assert sorted(read) == sorted(np.asarray(eval_source[i]["image"]).tobytes()
                                for i in range(len(eval_source)))


def test_settings_take_flags_first_then_the_environment():
  environ = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
             "JAX_PROCESS_ID": "3"}
  s = settings.settings(process_id=1, environ=environ)
  assert (s.coordinator_address, s.num_processes, s.process_id) == ("10.0.0.1:1234", 4, 1)
  assert s.describe("num_processes") == "JAX_NUM_PROCESSES=4"
  assert s.describe("process_id") == "--process_id=1"
  assert s.process_timeout_seconds == settings.DEFAULT_PROCESS_TIMEOUT_SECONDS <= 120
  # Nothing given: all left to the cluster's detection.
  s = settings.settings(environ={}, process_timeout_seconds=10)
  assert (s.coordinator_address, s.num_processes, s.process_id) == (None, None, None)
  assert s.process_timeout_seconds == 10


@pytest.mark.parametrize("kwargs,environ,message", [
    ({}, {"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"},
     "JAX_PROCESS_ID=2 with JAX_NUM_PROCESSES=2: process ids are 0 to 1."),
    ({"num_processes": 2, "process_id": 5}, {},
     "--process_id=5 with --num_processes=2: process ids are 0 to 1."),
    ({"process_id": -1}, {}, "--process_id=-1: process ids are 0, 1, ..."),
    ({}, {"JAX_NUM_PROCESSES": "0"}, "JAX_NUM_PROCESSES=0: the number of processes must "
     "be at least 1."),
    ({}, {"JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES='two' is not an integer."),
    ({}, {"JAX_COORDINATOR_ADDRESS": "localhost"},
     "JAX_COORDINATOR_ADDRESS=localhost: expected host:port"),
    ({"process_timeout_seconds": 0}, {}, "--process_timeout_seconds=0: must be at least 1."),
])
def test_impossible_settings_are_clear_errors(kwargs, environ, message):
  with pytest.raises(ConfigError) as error:
    settings.settings(environ=environ, **kwargs)
  assert message in str(error.value)


def _without_cluster(environ) -> dict[str, str]:
  """The environment minus what JAX's cluster detection (and our settings) read."""
  prefixes = ("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_",
              "OMPI_", "PMIX_", "KUBERNETES_", "TPU_", "MEGASCALE_")
  return {k: v for k, v in environ.items() if not k.startswith(prefixes)}


@pytest.mark.parametrize("env,message", [
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_PROCESS_ID": "0"},
     "--multihost: the number of processes (--num_processes or JAX_NUM_PROCESSES) is not "
     "set, and JAX detected no cluster (Cloud TPU, SLURM, Open MPI, Kubernetes) to take "
     "it from. Set it for every process (given: JAX_COORDINATOR_ADDRESS=localhost:1234, "
     "JAX_PROCESS_ID=0)."),
    ({}, "--multihost: the coordinator address (--coordinator_address or JAX_COORDINATOR_ADDRESS), "
     "the number of processes (--num_processes or JAX_NUM_PROCESSES) and the process id "
     "(--process_id or JAX_PROCESS_ID) are not set"),
    ({"JAX_COORDINATOR_ADDRESS": "localhost:1234", "JAX_NUM_PROCESSES": "2",
      "JAX_PROCESS_ID": "2"}, "JAX_PROCESS_ID=2 with JAX_NUM_PROCESSES=2"),
])
def test_train_py_with_incomplete_settings_stops_before_anything_runs(tmp_path, env,
                                                                      message):
  result = subprocess.run(
      [sys.executable, str(REPO / "train.py"), "--multihost", f"--workdir={tmp_path / 'w'}"],
      cwd=tmp_path, env={**_without_cluster(os.environ), "JAX_PLATFORMS": "cpu", **env},
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1, result.stderr[-3000:]
  assert f"train.py: error: {message}" in result.stderr, result.stderr[-3000:]
  assert not (tmp_path / "w").exists()


def test_multihost_settings_need_multihost(tmp_path):
  result = subprocess.run([sys.executable, str(REPO / "train.py"), "--num_processes=2"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
  assert result.returncode != 0
  assert "--num_processes: only used with --multihost" in result.stderr
