r"""Trains or evaluates a SASA model: the command-line entry point.

    python train.py                                   # default config, default workdir
    python train.py --config=configs/cifar10.py --workdir=/tmp/cifar
    python train.py --config=configs/imagenet.py:sasa_resnet26 --workdir=... \
        --config.batch_size=1024
    python train.py --workdir=/tmp/cifar --mode=evaluate [--checkpoint_step=N]

Re-running a command on a workdir that holds checkpoints resumes it. Every
hyperparameter is a config key (override any with --config.<key>=<value>); the flags
below only say what to do and where.
"""

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Light modules: the JAX imports come after the flags are parsed.
from sasa_jax import errors
from sasa_jax.workdir import signals

# SIGTERM or Ctrl-C from the start says what it stopped. Training installs its own
# handlers (they checkpoint after the current step); with --multihost, jax.distributed's
# preemption service takes SIGTERM over.
signal.signal(signal.SIGTERM, signals.exit_while_starting)
signal.signal(signal.SIGINT, signals.exit_while_starting)

_HERE = os.path.dirname(os.path.abspath(__file__))
_DEFAULT_CONFIG = os.path.join(_HERE, "configs", "default.py")
if _HERE not in sys.path:  # Configs import each other as `from configs import ...`.
  sys.path.insert(0, _HERE)



def _exit_on_unknown_key(error: AttributeError | KeyError) -> None:
  """ml_collections refuses a config key that does not exist with an AttributeError or
  KeyError: one ``train.py: error:`` line naming the ``--config.<key>`` overrides that
  no declared key matches, with the closest keys."""
  from sasa_jax.config import keys  # pylint: disable=g-import-not-at-top

  overrides = [arg[len("--config."):].split("=")[0] for arg in sys.argv[1:]
               if arg.startswith("--config.")]
  unknown = [path for path in overrides if path not in keys.paths()]
  if not unknown:  # Not an override: e.g. a config file that sets an unknown key.
    sys.exit(f"train.py: error: {error.args[0] if error.args else error}")
  problems = []
  for path in unknown:
    close = keys.closest(path)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    problems.append(f"unknown config key {path!r}{hint}")
  sys.exit(f"train.py: error: {'; '.join(problems)}; `python -m sasa_jax.config` lists "
           f"every key.")


try:  # The default config file is loaded (and overridden) here already.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG,
      "Config file: `configs/<name>.py` or `configs/<name>.py:<arg>`; override keys "
      "with --config.<key>=<value>.")
except (AttributeError, KeyError) as e:
  _exit_on_unknown_key(e)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Directory for checkpoints, config.json, TensorBoard logs and evaluation.json. "
    "Default: ./workdirs/<config name>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "evaluate"],
                          "train (resumes if the workdir has checkpoints) or "
                          "evaluate (writes <workdir>/evaluation.json).")
_CHECKPOINT_STEP = flags.DEFINE_integer(
    "checkpoint_step", None, "With --mode=evaluate: the checkpoint step to "
    "evaluate (default: the latest).", lower_bound=0)
_RESTART_FROM_SCRATCH = flags.DEFINE_bool(
    "restart_from_scratch", False, "Train from step 0 in a workdir whose checkpoints "
    "were all found damaged and moved to <workdir>/corrupt_checkpoints/ (such a "
    "workdir is refused otherwise).")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On an error, show its traceback (and Orbax's error logs) "
    "instead of one `train.py: error:` line.")
_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "One of several processes (e.g. one per host): start "
    "jax.distributed first. On Cloud TPU, SLURM, Open MPI and Kubernetes the "
    "processes find each other; elsewhere give --coordinator_address, "
    "--num_processes and --process_id (or JAX_COORDINATOR_ADDRESS, "
    "JAX_NUM_PROCESSES, JAX_PROCESS_ID).")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "With --multihost: host:port of process 0 (the same "
    "on every process). Default: $JAX_COORDINATOR_ADDRESS, or detected.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "With --multihost: the number of processes. Default: "
    "$JAX_NUM_PROCESSES, or detected.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "With --multihost: this process's id, 0 to num_processes - 1. "
    "Default: $JAX_PROCESS_ID, or detected.")
_PROCESS_TIMEOUT = flags.DEFINE_integer(
    "process_timeout_seconds", None, "With --multihost: how long the others wait for "
    "a process that is lost (killed, host down) before they stop too; a process that "
    "failed waits twice as long for the others. Default: 100.")
_MULTIHOST_SETTINGS = (_COORDINATOR_ADDRESS, _NUM_PROCESSES, _PROCESS_ID,
                       _PROCESS_TIMEOUT)


def default_workdir(config_flag: str) -> str:
  """``./workdirs/<config file name>[_<arg>]``."""
  path, _, arg = config_flag.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return os.path.join("workdirs", f"{name}_{arg}" if arg else name)


class _LibraryLogFilter:
  """Drops INFO logs of Orbax, grain and JAX (very chatty); keeps their warnings.
  Without --traceback, drops the error logs of Orbax and of its asyncio tasks too:
  the tracebacks of a failed save (hundreds of lines), which the run reports in its
  one `train.py: error:` line."""

  _PATHS = ("/orbax/", "/grain/", "/jax/", "/jaxlib/")
  _SAVE_ERROR_PATHS = ("/orbax/", "/asyncio/")

  def filter(self, record) -> bool:
    if (record.levelno >= logging.converter.STANDARD_ERROR
        and any(p in record.pathname for p in self._SAVE_ERROR_PATHS)):
      return _TRACEBACK.value
    return (record.levelno >= logging.converter.STANDARD_WARNING
            or not any(p in record.pathname for p in self._PATHS))


def _one_line(error: Exception) -> str:
  """An error the user can fix, one of the disk (an ``OSError``) or of the host's memory
  (a ``MemoryError``: numpy's allocations, not a device's), in one line."""
  if isinstance(error, OSError) and error.strerror:
    where = f" ({error.filename})" if error.filename else ""
    return (f"{error.strerror}{where}. Check the path and its disk (free space, "
            f"permissions); --traceback shows where it happened.")
  if isinstance(error, MemoryError):
    return (f"Out of host memory ({error or 'MemoryError'}). Lower config.batch_size, "
            "config.eval_batch_size or config.image_size.")
  return str(error)


def _exit_quietly(status: int) -> None:
  """Exits with nothing more on stderr: the libraries' cleanup at exit can fail again
  on the fault just reported (a full disk) and print tracebacks after the error line
  (--traceback keeps them)."""
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, sys.stderr.fileno())
  sys.exit(status)


def _flag_error(error: flags.Error) -> str:
  """absl's message, one line: its first line, then the innermost cause's message where
  that is not already in it (a config file's ``get_config`` raised it)."""
  root = error
  while root.__cause__ is not None or root.__context__ is not None:
    root = root.__cause__ or root.__context__
  first = str(error).splitlines()[0].rstrip(": ")
  return first if str(root) in first else f"{first}: {root}"


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every mistake reported as one ``train.py: error:`` line,
  those in a config file included (a syntax error, or ``get_config`` raising)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"train.py: error: {_flag_error(e)}")
  except (AttributeError, KeyError) as e:
    _exit_on_unknown_key(e)
  except SyntaxError as e:  # Executing a config file.
    sys.exit(f"train.py: error: {e.filename}:{e.lineno}: {e.msg}")
  except Exception as e:  # pylint: disable=broad-except  # Executing a config file.
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")),
                _DEFAULT_CONFIG)
    sys.exit(f"train.py: error: --config={path}: {type(e).__name__}: {e}")


def _check_flag_combinations(argv) -> None:
  """Flags that mean nothing together: one ``train.py: error:`` line, before any import."""
  problems = []
  if len(argv) > 1:
    problems.append(f"unexpected arguments: {' '.join(argv[1:])}")
  if _CHECKPOINT_STEP.value is not None and _MODE.value != "evaluate":
    problems.append("--checkpoint_step is only used with --mode=evaluate")
  if _RESTART_FROM_SCRATCH.value and _MODE.value != "train":
    problems.append("--restart_from_scratch is only used with --mode=train")
  multihost_flags = [f"--{f.name}" for f in _MULTIHOST_SETTINGS if f.present]
  if multihost_flags and not _MULTIHOST.value:
    problems.append(f"{', '.join(multihost_flags)}: only used with --multihost")
  if problems:
    sys.exit(f"train.py: error: {'; '.join(problems)}.")


def main(argv):
  _check_flag_combinations(argv)
  logging.get_absl_handler().addFilter(_LibraryLogFilter())
  # Imported here so that flag errors come before the (slower) JAX imports.
  from sasa_jax import training  # pylint: disable=g-import-not-at-top
  from sasa_jax.distributed import processes, settings  # pylint: disable=g-import-not-at-top

  config_flag = flags.FLAGS["config"].config_filename
  workdir = _WORKDIR.value or default_workdir(config_flag)
  logging.info("Config %s, workdir %s", config_flag, os.path.abspath(workdir))
  try:
    if _MULTIHOST.value:  # Before anything touches a device.
      processes.initialize(settings.settings(
          **{f.name: f.value for f in _MULTIHOST_SETTINGS}))
    if _MODE.value == "train":
      training.train_and_evaluate(_CONFIG.value, workdir,
                                  restart_from_scratch=_RESTART_FROM_SCRATCH.value)
    elif flags.FLAGS["config"].present:
      training.evaluate_checkpoint(_CONFIG.value, workdir,
                                   checkpoint_step=_CHECKPOINT_STEP.value)
    else:  # The config saved with the checkpoint, with the --config.<key>= given.
      training.evaluate_checkpoint(
          None, workdir, checkpoint_step=_CHECKPOINT_STEP.value,
          overrides=config_flags.get_override_values(flags.FLAGS["config"]))
  except errors.TrainingInterrupted as e:  # SIGTERM or Ctrl-C: checkpointed, resumable.
    print(f"train.py: {e}", file=sys.stderr, flush=True)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # A second Ctrl-C.
    print("train.py: Stopped by a second Ctrl-C, without a checkpoint of the steps since "
          "the last one. Re-run the same command to resume from it.", file=sys.stderr,
          flush=True)
    _exit_quietly(128 + signal.SIGINT)
  except (errors.Error, OSError, MemoryError) as e:  # The user can fix it: no traceback.
    if _TRACEBACK.value:
      raise
    print(f"train.py: error: {_one_line(e)}", file=sys.stderr, flush=True)
    _exit_quietly(1)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
