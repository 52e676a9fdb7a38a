"""Read-time skips: a record whose file passed indexing but fails when read (pixels cut short,
NaN voxels, a damaged compressed stream, NaN ECG samples) is replaced, with
`on_error="skip"`, by the next readable record of the same split, so batches stay full and a
resumed run reads exactly what an uninterrupted one did.

Each such file is named once in a CSV beside the run's artifacts (`<workdir>/skipped.csv`:
path, reason, the training step whose batch first met it, and the time), appended with one write per line (atomic for short lines,
so Grain's worker processes may share it). A file listed there is not read again: on resume
its records go straight to their replacement. Without skip, the read error names the file
and says that skip exists.
"""
from __future__ import annotations

import contextlib
import contextvars
import csv
import datetime
import io
import logging
import os
import pathlib
from typing import Callable, Sequence

log = logging.getLogger(__name__)

SKIP_FILE = "skipped.csv"
# Set in a record that stands in for an unreadable one: a join by subject must not pair it
# with the subject it replaced (`data/multimodal.py` treats that modality as absent).
REPLACED = "replaced_unreadable_record"
_HEADER = "path,reason,first_seen_step,first_seen_time\n"
_MAX_REPLACEMENTS = 64  # consecutive unreadable records before giving up: the data is broken
_MAX_REASON = 2000  # characters of a read error kept in the log and the skip file
# The training step whose batch is being read, set around a read by the training stream
# (`data/pipeline.py`), which knows each record's position in the global stream; unset
# (written as "") for evaluation, embedding and mixed streams.
_STEP: contextvars.ContextVar[int | None] = contextvars.ContextVar("read_skips_step", default=None)


@contextlib.contextmanager
def at_step(step: int | None):
  """Reads inside this block that fail are recorded as first seen at training `step`."""
  token = _STEP.set(step)
  try:
    yield
  finally:
    _STEP.reset(token)


def skip_file_for(artifacts_dir: str | os.PathLike | None) -> str:
  """`<workdir>/skipped.csv` for a run's artifacts directory ('' without one)."""
  return str(pathlib.Path(artifacts_dir).parent / SKIP_FILE) if artifacts_dir else ""


def listed(skip_file: str) -> set[str]:
  """The paths a skip file lists (none when there is no file)."""
  if not skip_file or not os.path.exists(skip_file):
    return set()
  with open(skip_file, newline="") as f:
    return {row["path"] for row in csv.DictReader(f)}


def one_line(reason: str) -> str:
  """`reason` on one line, every line of it kept (a decoder's error lists a reason per plugin
  below its first line), capped at `_MAX_REASON` characters."""
  text = "; ".join(line.strip() for line in reason.splitlines() if line.strip())
  return text if len(text) <= _MAX_REASON else text[:_MAX_REASON - 3] + "..."


def record(skip_file: str, path: str, reason: str) -> None:
  """Appends one line naming `path` (one write, so concurrent writers never interleave)."""
  if not skip_file:
    return
  line = io.StringIO()
  step = _STEP.get()
  csv.writer(line).writerow([path, one_line(reason), "" if step is None else step,
                             datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")])
  fd = os.open(skip_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
  try:
    if os.fstat(fd).st_size == 0:
      os.write(fd, _HEADER.encode())
    os.write(fd, line.getvalue().encode())
  finally:
    os.close(fd)


def read_or_replace(index: int, paths: Sequence[str], read: Callable[[int], dict], *, on_error: str,
                    skip_file: str, known_bad: set[str]) -> dict:
  """`read(index)`, or with on_error="skip" the first of index + 1, index + 2, ... (cyclic)
  that reads; each failing file is recorded once and never read again by this source."""
  if on_error != "skip":
    try:
      return read(index)
    except ValueError as e:
      raise ValueError(f"{e} (on_error='skip' replaces such records and names them in {SKIP_FILE})") from e
  tried = min(_MAX_REPLACEMENTS, len(paths))  # distinct records: the walk never wraps onto itself
  for step in range(tried):
    i = (index + step) % len(paths)
    if paths[i] in known_bad:
      continue
    try:
      out = read(i)
      return out if i == index else {**out, REPLACED: True}
    except ValueError as e:
      known_bad.add(paths[i])
      if paths[i] not in listed(skip_file):
        record(skip_file, paths[i], str(e))
      log.warning("skipping unreadable %s (on_error='skip'): %s", paths[i], one_line(str(e)))
  raise ValueError(f"{unreadable_records(paths, index, tried)} (on_error='skip'); the data looks broken, "
                   f"see {skip_file or 'the log'}")


def unreadable_records(paths: Sequence[str], index: int, tried: int) -> str:
  """Says which records of a split `read_or_replace` tried in vain: `tried` distinct ones
  from `index` on, counted as records (and as files, where records share a file)."""
  files = len({paths[(index + step) % len(paths)] for step in range(tried)})
  in_files = "" if files == tried else f" ({files} distinct file{'s' if files != 1 else ''})"
  if tried == len(paths):
    return (f"none of the {tried} record{'s' if tried != 1 else ''} of this split could be read{in_files}, "
            f"starting at {paths[index]}")
  return (f"{paths[index]} and the {tried - 1} record{'s' if tried != 2 else ''} after it could not be "
          f"read{in_files}")
