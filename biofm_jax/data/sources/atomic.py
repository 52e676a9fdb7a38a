"""Writing a dataset directory all-or-nothing.

Generators write into a hidden staging directory beside the target and rename it into
place only when every file is written, so a crash or kill never leaves a half-written
dataset that a later run would take for a complete one.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
from typing import Iterator


@contextlib.contextmanager
def atomic_directory(out: pathlib.Path) -> Iterator[pathlib.Path]:
  """Yields an empty staging directory; on success it becomes `out` in one rename."""
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = out.parent / f".{out.name}.partial-{os.getpid()}"
  if staging.exists():  # left by a crashed earlier write from a process with our pid
    shutil.rmtree(staging)
  staging.mkdir()
  try:
    yield staging
    os.replace(staging, out)  # replaces an empty directory atomically on POSIX
  finally:
    if staging.exists():
      shutil.rmtree(staging)
