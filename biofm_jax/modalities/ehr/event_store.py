"""An out-of-core MEDS dataset: every event on disk, an index of subjects in memory.

`event_indexing.build_event_store(meds_root, out, workers=N)` (or
`experiments/index_meds.py`) writes it:

  out/
    source.json          format, the MEDS root, every data file's size, mtime and duplicate
                         rows, every column file's size, stats
    index.parquet        one row per (subject, file): rows [start, end) of that file's
                         columns, static rows, first timed event, split, duplicate rows
                         (and those dropped when read), a CRC-32 of each column's rows
    shards/<k>.codes     int32 code ids local to file k      (raw little-endian columns,
    shards/<k>.times     int64 microseconds, NAT for static   read with os.pread: only the
    shards/<k>.values    float32, NaN for no value            bytes a record needs)
    shards/<k>.json      file k's code strings (local id -> code)
    training_codes.json  every code's count over the training split
    value_sketch/*.npy   per code, a uniform sample of its training values (see below)

`EventStore(out)` behaves like `meds.MEDSDataset` (splits, stats, `source(split)` with
`record_until`, ...), so training, evaluation and fine-tuning read it unchanged; a training
process holds only the subject index (about 60 bytes per subject) and the code tables. A
data file changed or added after the build is detected (size, mtime, file list) and refused.

Rows are what `MEDSDataset` holds, with the same checks, errors and counts, and the same
duplicate rule (`duplicates.py`): rows identical to an earlier row of the subject, in its
file or in an earlier one, are counted and, by default, dropped (within a file when it is
indexed; across files, found when the store is built and dropped when a record is read).

Corruption is refused with an error naming the file: every column file's size is checked
when the store opens, and each record's bytes against the CRC-32 recorded for them at
indexing when it is read (so a file written over in place never trains silently).

Value quantiles come from a bottom-k sample: each training value gets a pseudo-random key
(a hash of its file and row), and each code keeps the `SKETCH_SIZE` values with the
smallest keys, so merging files' samples is exact (the k smallest of the union) and the
result is a uniform sample without replacement of the code's values. A code with at most
`SKETCH_SIZE` training values keeps all of them, so its quantiles are exact. Otherwise, by
the Dvoretzky-Kiefer-Wolfowitz inequality, every quantile edge's rank among the code's
values is within ERROR_BOUND (1.4 percentile points at SKETCH_SIZE = 20,000) of the exact
one with probability at least 0.999 (tested in tests/test_event_store.py).
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import pathlib
import threading
import zlib

import meds
import numpy as np
import pyarrow.parquet as pq

from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.data.sources.indexing import checked_index
from biofm_jax.modalities.ehr import duplicates
from biofm_jax.modalities.ehr import meds as meds_source
from biofm_jax.modalities.ehr import meds_files

log = logging.getLogger(__name__)

FORMAT = "biofm_jax.ehr_event_store"
FORMAT_VERSION = 2  # 2: cross-file duplicates, per-record checksums, shard sizes
SOURCE_FILE = "source.json"
SKETCH_SIZE = 20_000
SKETCH_FAILURE = 1e-3
ERROR_BOUND = math.sqrt(math.log(2 / SKETCH_FAILURE) / (2 * SKETCH_SIZE))  # DKW: ~0.0138
STAT_KEYS = meds_source.STAT_KEYS
COLUMNS = (("codes", np.int32), ("times", np.int64), ("values", np.float32))
CHECKSUMS = tuple(f"crc_{name}" for name, _ in COLUMNS)  # index columns: CRC-32 of an entry's rows, per column
NAT = meds_files.NAT
MAX_OPEN_FILES = 96  # shard files a process keeps open per store (3 per data file)


def file_signature(path: pathlib.Path) -> dict[str, int]:
  """What tells a data file changed: its size and modification time."""
  stat = path.stat()
  return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# ================================================================ reading
class EventStore:
  """An event store opened for reading; the interface of `meds.MEDSDataset`."""

  def __init__(self, path: str | os.PathLike, *, check_source: bool = True):
    self.path = pathlib.Path(path)
    source_file = self.path / SOURCE_FILE
    if not source_file.exists():
      raise ValueError(f"{self.path}: not an event store (no {SOURCE_FILE}); build one with "
                       "experiments/index_meds.py")
    try:
      info = json.loads(source_file.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f"{source_file}: not valid JSON ({e})") from e
    if info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{source_file}: format {info.get('format')!r} version {info.get('format_version')!r}, "
                       f"expected {FORMAT!r} version {FORMAT_VERSION}")
    self.root = pathlib.Path(info["meds_root"])
    self.stats: dict[str, int] = dict(info["stats"])
    if check_source:
      self._check_unchanged(info["files"])
    self._check_shard_sizes(info["shards"])
    table = pq.read_table(self.path / "index.parquet")
    col = lambda name: table.column(name).to_numpy(zero_copy_only=False)  # noqa: E731
    entry_subjects = col("subject_id")
    self.subject_ids, first_entry = np.unique(entry_subjects, return_index=True)
    # Per subject: its index entries [first_entry, next) (one per data file holding it).
    self._entries = np.r_[first_entry, len(entry_subjects)].astype(np.int64)
    self._file, self._start, self._end = col("file"), col("start"), col("end")
    self._checksums = np.stack([col(name) for name in CHECKSUMS], axis=1)
    # Rows that duplicate a row of an earlier file are in the shards, dropped when read.
    self.drop_duplicates = bool(info["drop_duplicates"])
    rows = self._end - self._start - col("dropped_rows")
    self._rows = np.add.reduceat(rows, first_entry) if len(rows) else np.zeros(0, np.int64)
    static = col("static_rows") - col("dropped_static")
    self._static = np.add.reduceat(static, first_entry) if len(rows) else np.zeros(0, np.int64)
    first = col("first_time")
    first = np.where(first == NAT, np.iinfo(np.int64).max, first)
    first = np.minimum.reduceat(first, first_entry) if len(first) else first
    self._first_times = np.where(first == np.iinfo(np.int64).max, NAT, first).view("datetime64[us]")
    split_of = col("split")[first_entry]
    self.splits = {name: self.subject_ids[split_of == name]
                   for name in splits_lib.ordered(set(split_of.tolist()) - {""})}
    duplicates.log_duplicates(f"event store {self.path}", duplicates.counts_by_split(
        self.subject_ids, np.add.reduceat(col("duplicate_rows"), first_entry) if len(rows) else np.zeros(0, np.int64),
        self.splits), {pathlib.Path(f["path"]).name: f["duplicate_rows"] for f in info["files"] if f["duplicate_rows"]},
        dropped=self.drop_duplicates)
    codes = json.loads((self.path / "training_codes.json").read_text())
    self.code_vocab = np.array(codes["codes"], dtype=object)
    self.training_code_counts = dict(zip(codes["codes"], codes["counts"]))
    self._code_maps = {int(p.name.split(".")[0]): np.load(p) for p in (self.path / "shards").glob("*.code_map.npy")}
    self._reader = ShardReader(self.path)  # shared by every source of the store
    log.info("event store %s: %d subjects, %s", self.path, len(self.subject_ids),
             ", ".join(f"{k}={v}" for k, v in self.stats.items()))

  def _check_unchanged(self, files: list[dict]) -> None:
    for entry in files:
      path = self.root / meds.data_subdirectory / entry["path"]
      if not path.exists():
        raise ValueError(f"{path}: was indexed in the event store {self.path} but is gone; rebuild the store")
      now = file_signature(path)
      if now != {"size": entry["size"], "mtime_ns": entry["mtime_ns"]}:
        raise ValueError(f"{path}: changed after the event store {self.path} was built (size/mtime "
                         f"{entry['size']}/{entry['mtime_ns']} then, {now['size']}/{now['mtime_ns']} now); "
                         "rebuild the store")
    found = {str(p.relative_to(self.root / meds.data_subdirectory))
             for p in meds_files.find_data_files(self.root / meds.data_subdirectory)}
    added = sorted(found - {e["path"] for e in files})
    if added:
      raise ValueError(f"{self.root / meds.data_subdirectory}: {len(added)} data file(s) added after the event "
                       f"store {self.path} was built (e.g. {added[0]}); rebuild the store")

  def _check_shard_sizes(self, sizes: dict[str, int]) -> None:
    """Cheap, at opening: every column file has the size it was written with (a copy cut
    short or grown); bytes written over in place are caught by the checksums when read."""
    for name, size in sizes.items():
      path = self.path / "shards" / name
      found = path.stat().st_size if path.is_file() else None
      if found != size:
        raise ValueError(f"{path}: {'missing' if found is None else f'{found} bytes'}, expected {size} bytes as "
                         "written when the event store was built; rebuild the event store")

  def training_values(self) -> dict[str, np.ndarray]:
    """Per code, the sample of its training values (all of them up to SKETCH_SIZE)."""
    codes = np.load(self.path / "value_sketch" / "codes.npy")
    values = np.load(self.path / "value_sketch" / "values.npy")
    order = np.argsort(codes, kind="stable")
    codes, values = codes[order], values[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
    ends = np.r_[starts[1:], len(codes)]
    return {str(self.code_vocab[codes[s]]): values[s:e] for s, e in zip(starts, ends)}

  def source(self, split: str) -> StoreSource:
    if split not in self.splits:
      raise ValueError(f"{self.path}: unknown split {split!r}; available splits: {list(self.splits)}")
    return StoreSource(self, np.searchsorted(self.subject_ids, self.splits[split]))

  def all_subjects(self) -> StoreSource:
    return StoreSource(self, np.arange(len(self.subject_ids)))

  def read(self, position: int) -> dict:
    """The record of subject `position` (in subject id order)."""
    reader = self._reader
    parts = []
    for e in range(self._entries[position], self._entries[position + 1]):
      file = int(self._file[e])
      codes, times, values = reader.read(file, int(self._start[e]), int(self._end[e]), self._checksums[e])
      parts.append((self._code_maps[file][codes], times, values))
    codes, times, values = (np.concatenate(p) for p in zip(*parts)) if len(parts) > 1 else parts[0]
    if len(parts) > 1:  # a subject in several files: merged in time order, static rows first
      if self.drop_duplicates:  # rows equal to one of an earlier file (`duplicates.py`)
        keep = ~duplicates.duplicate_rows(np.zeros(len(codes), np.int64), times, codes, values)
        codes, times, values = codes[keep], times[keep], values[keep]
      order = np.argsort(times, kind="stable")
      codes, times, values = codes[order], times[order], values[order]
    return {"subject_id": np.int64(self.subject_ids[position]), "codes": self.code_vocab[codes],
            "times": times.view("datetime64[us]"), "numeric_values": values}

  def close(self) -> None:
    """Closes the shard files this process opened (reading again reopens them)."""
    self._reader.close()

  def __repr__(self) -> str:
    return f"EventStore({str(self.path)!r}, subjects={len(self.subject_ids)}, rows={self.stats['rows']})"


class ShardReader:
  """Reads row ranges of the shard columns with os.pread: no memory map, so a process's
  resident memory holds only the records it is reading. One per store, shared by all its
  sources (the training loop asks for a new evaluation source every evaluation); files
  open lazily (per process), and at most MAX_OPEN_FILES at once, the least recently read
  closed first, so a store of many shards never exhausts the process's descriptors."""

  def __init__(self, path: pathlib.Path):
    self.path, self._fds = path, collections.OrderedDict()
    # The training stream's reader thread and evaluation share the reader: a descriptor
    # closed by one thread's eviction must not be read by another (its number may be reused).
    self._lock = threading.Lock()

  def read(self, file: int, start: int, end: int, checksums=None):
    """The three columns' rows [start, end) of data file `file`; `checksums` (CRC-32 per
    column, from the index) are verified: bytes written over after the build are refused."""
    with self._lock:
      return self._read(file, start, end, checksums)

  def _read(self, file: int, start: int, end: int, checksums):
    out = []
    for c, (name, dtype) in enumerate(COLUMNS):
      size = np.dtype(dtype).itemsize
      data = os.pread(self._fd(file, name), (end - start) * size, start * size)
      if len(data) != (end - start) * size:
        raise ValueError(f"{self.path / 'shards' / f'{file}.{name}'}: cut short (rows {start}..{end} asked); "
                         "rebuild the event store")
      if checksums is not None and zlib.crc32(data) != int(checksums[c]):
        raise ValueError(f"{self.path / 'shards' / f'{file}.{name}'}: rows {start}..{end} do not match the checksum "
                         "recorded when the store was built (the file was changed or corrupted); rebuild the event store")
      out.append(np.frombuffer(data, dtype).copy())
    return out

  def _fd(self, file: int, name: str) -> int:
    key = (file, name)
    if key in self._fds:
      self._fds.move_to_end(key)
      return self._fds[key]
    while len(self._fds) >= MAX_OPEN_FILES:
      os.close(self._fds.popitem(last=False)[1])
    self._fds[key] = os.open(self.path / "shards" / f"{file}.{name}", os.O_RDONLY)
    return self._fds[key]

  def close(self) -> None:
    with self._lock:
      while self._fds:
        os.close(self._fds.popitem()[1])

  def __del__(self):
    try:
      self.close()
    except (OSError, AttributeError, TypeError):  # at interpreter exit os may be gone already
      pass

  def __getstate__(self):
    return {"path": self.path}  # file descriptors do not travel to worker processes

  def __setstate__(self, state):
    self.path, self._fds, self._lock = state["path"], collections.OrderedDict(), threading.Lock()


class StoreSource:
  """The records of one split of an event store: the interface of `meds.MEDSSource`."""

  def __init__(self, store: EventStore, positions: np.ndarray):
    self._store, self._positions = store, np.asarray(positions, np.int64)
    self.subject_ids = store.subject_ids[self._positions]

  def __len__(self) -> int:
    return len(self._positions)

  def __getitem__(self, index: int) -> dict:
    i = checked_index(index, len(self), "StoreSource ... subjects")
    return self._store.read(int(self._positions[i]))

  def record_until(self, index: int, prediction_time: np.datetime64, *, inclusive: bool = True) -> dict:
    """Record `index` cut at `prediction_time` (`meds.cut_record`, the LabelSchema rule)."""
    return meds_source.cut_record(self[index], prediction_time, inclusive=inclusive)

  def event_counts(self) -> np.ndarray:
    return self._store._rows[self._positions].astype(np.int64)

  def static_counts(self) -> np.ndarray:
    return self._store._static[self._positions].astype(np.int64)

  def first_event_times(self) -> np.ndarray:
    return self._store._first_times[self._positions]

  def __repr__(self) -> str:
    return f"StoreSource(subjects={len(self)})"
