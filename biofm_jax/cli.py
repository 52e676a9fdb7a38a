"""What every command in `experiments/` shares: readable logging and `--config.a.b=v` overrides.

    def main(argv, overrides): ...
    if __name__ == "__main__":
      cli.run(main)
"""
from __future__ import annotations

import logging
import sys
from typing import Callable
from absl import app
from biofm_jax.config import split_config_overrides
from biofm_jax.config import load_config

QUIET_LOGGERS = ("absl", "orbax", "jax", "grain")  # their INFO lines drown the run's progress


def configure_logging() -> None:
  """Timestamped INFO lines on stdout from biofm_jax; warnings only from the libraries."""
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True,
                      stream=sys.stdout)
  for name in QUIET_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)


def run(main: Callable[[list[str], dict[str, str]], None]) -> None:
  """absl's app.run for `main(argv, overrides)`, with `--config.a.b=v` taken out of argv
  (`load_config` applies them and names an unknown field; absl would only see an unknown
  flag), and logging configured."""

  argv, overrides = split_config_overrides(sys.argv)

  def wrapped(rest):
    configure_logging()
    main(rest, overrides)
  app.run(wrapped, argv=argv)


def load_config_or_exit(spec: str, overrides: dict[str, str]):
  """The config `spec` with `overrides`, or exit with the field and problem named."""
  try:
    return load_config(spec, overrides)
  except (KeyError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error in --config: {e}")
