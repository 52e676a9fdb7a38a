"""Index-time skips named: the files a source dropped while indexing (`on_error="skip"`:
wrong rank, unsupported format, corrupt header, ...) and the files a folder scan ignored.

Counts alone (`stats["skipped_<reason>"]`) do not tell a user which file to fix, so a
source names them twice: the first few in one warning with the total, and every one in a
CSV beside the run's artifacts, `<workdir>/skipped_at_indexing.csv` (path, reason,
message). The CSV is rewritten whole by each indexing (to a temporary name, then renamed:
processes indexing the same data write the same file), so it always describes the data as
last indexed; it is not consulted by reads (read-time skips live in `read_skips.py`'s
skipped.csv). Messages are the source's own one-line errors: paths, shapes, header
fields, never pixel values or record contents.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import pathlib
import tempfile
from typing import NamedTuple, Sequence

INDEX_SKIP_FILE = "skipped_at_indexing.csv"
NAMED_IN_LOG = 5  # files named in the warning; the CSV names them all
_HEADER = ("path", "reason", "message")


class IndexSkip(NamedTuple):
  path: str
  reason: str  # the stats key's suffix: "rank", "unsupported", ... or "ignored"
  message: str  # one line naming the file and what was expected


def index_skip_file_for(artifacts_dir: str | os.PathLike | None) -> str:
  """`<workdir>/skipped_at_indexing.csv` for a run's artifacts directory ('' without one)."""
  return str(pathlib.Path(artifacts_dir).parent / INDEX_SKIP_FILE) if artifacts_dir else ""


def warn_named(log: logging.Logger, what: str, skips: Sequence[IndexSkip], index_skip_file: str) -> None:
  """One warning: how many `what` (e.g. "imaging /data/ct: skipped") per reason, the first
  few named, and where the rest are listed."""
  if not skips:
    return
  by_reason: dict[str, int] = {}
  for skip in skips:
    by_reason[skip.reason] = by_reason.get(skip.reason, 0) + 1
  counts = ", ".join(f"{reason}={n}" for reason, n in by_reason.items())
  named = " | ".join(skip.message.splitlines()[0][:300] for skip in skips[:NAMED_IN_LOG])
  more = len(skips) - NAMED_IN_LOG
  rest = (f"; {more} more" if more > 0 else "") + (f"; all listed in {index_skip_file}" if index_skip_file else "")
  log.warning("%s %d item(s) at indexing (%s): %s%s", what, len(skips), counts, named, rest)


def write_index_skips(index_skip_file: str, skips: Sequence[IndexSkip]) -> None:
  """Writes every skip to `index_skip_file` (no-op for ''); with none, a stale file from an
  earlier indexing is emptied to its header rather than left to mislead."""
  if not index_skip_file or (not skips and not os.path.exists(index_skip_file)):
    return
  text = io.StringIO()
  writer = csv.writer(text)
  writer.writerow(_HEADER)
  writer.writerows((s.path, s.reason, s.message.splitlines()[0][:300]) for s in skips)
  folder = os.path.dirname(index_skip_file) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{INDEX_SKIP_FILE}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w", newline="") as f:
      f.write(text.getvalue())
    os.replace(tmp, index_skip_file)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def read_index_skips(index_skip_file: str) -> list[IndexSkip]:
  """The skips a file lists (none when there is no file)."""
  if not index_skip_file or not os.path.exists(index_skip_file):
    return []
  with open(index_skip_file, newline="") as f:
    return [IndexSkip(row["path"], row["reason"], row["message"]) for row in csv.DictReader(f)]
