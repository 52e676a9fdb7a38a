"""What every command in `experiments/` shares: readable logging and `--config.a.b=v` overrides.

    def main(argv, overrides): ...
    if __name__ == "__main__":
      cli.run(main)
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, NoReturn

# Accelerator device files: a host without any runs JAX on its CPU. Without this, JAX probes
# the TPU runtime that the `dev` extra installs (for TPU sizing) and it prints a page of
# warnings that read like failures; ahead-of-time TPU sizing works without the probe.
ACCELERATOR_DEVICES = ("/dev/accel0", "/dev/vfio", "/dev/nvidia0", "/dev/nvidiactl", "/dev/kfd")
if "JAX_PLATFORMS" not in os.environ and not any(map(os.path.exists, ACCELERATOR_DEVICES)):
  os.environ["JAX_PLATFORMS"] = "cpu"  # before anything imports jax

from biofm_jax.host_memory import keep_freed_host_memory  # noqa: E402

if os.environ.get("JAX_PLATFORMS") == "cpu":
  keep_freed_host_memory()  # before jax starts its threads: steps stop page-faulting their buffers

from absl import app, flags  # noqa: E402

from biofm_jax import parallel  # noqa: E402  (after the platform choice above)
from biofm_jax.config import load_config, split_config_overrides  # noqa: E402

QUIET_LOGGERS = ("absl", "orbax", "jax", "grain")  # their INFO lines drown the run's progress
# What a command's input can be wrong with: a file, a row, a field, a config value. These end
# in one line naming it and exit status 2; anything else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)
EXIT_INPUT_ERROR = 2
EXIT_STOPPED_BY_SIGTERM = 128 + 15  # as a process ended by SIGTERM, so schedulers requeue it

flags.DEFINE_bool("verbose", False, "Show the traceback of data and config errors, not only their line.")


def define_distributed_flags() -> None:
  """--coordinator_address, --num_processes, --process_id: the commands that train on
  several hosts define them here, once (`initialize_distributed` reads them)."""
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")


def initialize_distributed() -> None:
  """`jax.distributed` from the flags `define_distributed_flags` made (nothing for one process)."""
  f = flags.FLAGS
  parallel.initialize_distributed(f.coordinator_address, f.num_processes, f.process_id)


def configure_logging() -> None:
  """Timestamped INFO lines on stdout from biofm_jax; warnings only from the libraries."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True,
                      stream=sys.stdout)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)


def error_line(error: BaseException) -> str:
  """`error: <message>` (a KeyError's message without the quotes its repr adds)."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  return f"error: {message}"


def run(main: Callable[[list[str], dict[str, str]], None]) -> None:
  """absl's app.run for `main(argv, overrides)`, with `--config.a.b=v` taken out of argv
  (`load_config` applies them and names an unknown field; absl would only see an unknown
  flag), and logging configured. A data or config error (`INPUT_ERRORS`) ends in one line on
  stderr and exit status 2; `--verbose` shows its traceback."""

  argv, overrides = split_config_overrides(sys.argv)

  def wrapped(rest):
    configure_logging()
    try:
      main(rest, overrides)
    except INPUT_ERRORS as e:
      if flags.FLAGS.verbose:
        raise
      print(error_line(e), file=sys.stderr)
      sys.exit(EXIT_INPUT_ERROR)
  app.run(wrapped, argv=argv)


def fail(message: str) -> NoReturn:
  """Ends a command with `error: <message>` on stderr and exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_INPUT_ERROR)


def load_config_or_exit(spec: str, overrides: dict[str, str]):
  """The config `spec` with `overrides`, or exit with the field and problem named."""
  try:
    return load_config(spec, overrides)
  except (KeyError, ValueError, FileNotFoundError) as e:
    fail(f"in --config: {error_line(e)[len('error: '):]}")
