"""Indexing a MEDS dataset into an event store (`event_store.py` describes the store).

`build_event_store(meds_root, out, workers=N)` streams each MEDS data file by parquet
batches, one file per worker (a process pool, or an Apache Beam pipeline with
`engine="beam"`); a worker's memory is bounded by a batch plus its file's subject index,
never by the dataset. Each worker writes its file's columns and a summary (subject index,
code counts, value sample) as arrays and JSON; the driver merges the summaries into one
index, code vocabulary and value sample. Everything is written in a staging folder and
renamed into place, so a killed build leaves nothing that training would read.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import pathlib
import zlib
from typing import Any, Iterator, Sequence

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.data.sources.atomic import atomic_directory
from biofm_jax.modalities.ehr import meds as meds_source
from biofm_jax.modalities.ehr import meds_files
from biofm_jax.modalities.ehr import store_duplicates
from biofm_jax.modalities.ehr.duplicates import duplicate_rows  # noqa: F401  (the rule; re-exported)
from biofm_jax.modalities.ehr.event_store import (CHECKSUMS, COLUMNS, FORMAT, FORMAT_VERSION, NAT, SKETCH_SIZE,
                                                  SOURCE_FILE, STAT_KEYS, file_signature)

log = logging.getLogger(__name__)

_BATCH_ROWS = 1 << 17
_TRAIN = meds.train_split


# ================================================================ one data file
@dataclasses.dataclass
class _Chunk:
  """Rows of whole subjects, sorted by (subject, time), static rows first."""
  subjects: np.ndarray
  times: np.ndarray
  codes: np.ndarray  # int32 local to the file
  values: np.ndarray


class _Unsorted(Exception):
  """A data file whose subjects' rows are not contiguous: it is sorted in memory instead."""


def _batches(path: pathlib.Path, parquet: pq.ParquetFile, codes: dict[str, int],
             stats: dict[str, int]) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
  """The file's rows by batches, standardised, codes mapped to the file's local ids."""
  columns = [c for c in meds_files.READ_COLUMNS if c in parquet.schema_arrow.names]
  first = 0
  try:
    for record_batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
      events = meds_files.standardize_table(path, pa.Table.from_batches([record_batch]), first)
      first += record_batch.num_rows
      to_local = np.array([codes.setdefault(c, len(codes)) for c in events.code_strings], np.int32)
      stats["nan_values"] += events.nan_values
      yield events.subjects, events.times, to_local[events.local_codes], events.values
  except (pa.ArrowException, OSError) as e:
    raise ValueError(f"{path}: parquet file could not be read ({e})") from e


def _sorted_chunks(batches, stats: dict[str, int]) -> Iterator[_Chunk]:
  """Batches regrouped into chunks of whole subjects (a subject's rows may straddle
  batches); raises _Unsorted when a subject's rows are not contiguous."""
  carry: list[np.ndarray] | None = None
  last_subject = None
  unsorted_times = False
  for batch in batches:
    parts = batch if carry is None else [np.concatenate([c, b]) for c, b in zip(carry, batch)]
    subjects = parts[0]
    if len(subjects) and (np.any(np.diff(subjects) < 0)
                          or (last_subject is not None and subjects[0] < last_subject)):
      raise _Unsorted
    tail = int(np.searchsorted(subjects, subjects[-1])) if len(subjects) else 0
    carry = [p[tail:] for p in parts]
    if tail:
      chunk, unsorted_times = _sort_chunk([p[:tail] for p in parts], unsorted_times)
      last_subject = int(chunk.subjects[-1]) + 1  # the next chunk starts with a later subject
      yield chunk
  if carry is not None and len(carry[0]):
    chunk, unsorted_times = _sort_chunk(carry, unsorted_times)
    yield chunk
  stats["unsorted_files"] += unsorted_times


def _sort_chunk(parts, unsorted: bool) -> tuple[_Chunk, bool]:
  subjects, times, codes, values = parts
  if not meds_source.is_meds_sorted(subjects, times):
    order = np.lexsort((times, subjects))  # stable: file order kept within equal times
    subjects, times, codes, values = subjects[order], times[order], codes[order], values[order]
    unsorted = True
  return _Chunk(subjects, times, codes, values), unsorted


def _whole_file_chunk(path: pathlib.Path, codes: dict[str, int], stats: dict[str, int]) -> Iterator[_Chunk]:
  """An unsorted file, read whole and sorted (memory bounded by this file, not the dataset)."""
  events = meds_files.read_data_file(path)
  to_local = np.array([codes.setdefault(c, len(codes)) for c in events.code_strings], np.int32)
  stats["nan_values"] += events.nan_values
  stats["unsorted_files"] += 1
  order = np.lexsort((events.times, events.subjects))
  yield _Chunk(events.subjects[order], events.times[order], to_local[events.local_codes][order],
               events.values[order])


@dataclasses.dataclass
class _FileIndex:
  """What indexing one data file gives back to the merge (all small: per subject or code)."""
  file: int
  subjects: np.ndarray
  starts: np.ndarray
  ends: np.ndarray
  static_rows: np.ndarray
  first_times: np.ndarray
  has_birth: np.ndarray
  has_death: np.ndarray
  duplicates: np.ndarray  # per subject: rows equal to an earlier row of it in this file
  checksums: np.ndarray  # [subjects, columns] uint32 CRC-32 of each column's rows (`CHECKSUMS`)
  codes: list[str]
  training_counts: np.ndarray  # per local code
  sketch_codes: np.ndarray  # local code, key and value of the kept training values
  sketch_keys: np.ndarray
  sketch_values: np.ndarray
  stats: dict[str, int]


def _bottom_k(codes: np.ndarray, keys: np.ndarray, values: np.ndarray, k: int):
  """Per code, the k entries with the smallest keys."""
  order = np.lexsort((keys, codes))
  codes, keys, values = codes[order], keys[order], values[order]
  starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]]) if len(codes) else np.zeros(0, np.int64)
  rank = np.arange(len(codes)) - np.repeat(starts, np.diff(np.r_[starts, len(codes)]))
  keep = rank < k
  return codes[keep], keys[keep], values[keep]


class _Sketch:
  """Bottom-k samples of values per code, compacted only when the pending entries outgrow
  the kept ones (so each value is sorted O(1) times on average)."""

  def __init__(self):
    self.kept = (np.zeros(0, np.int32), np.zeros(0, np.uint64), np.zeros(0, np.float32))
    self.pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    self.pending_rows = 0

  def add(self, codes: np.ndarray, keys: np.ndarray, values: np.ndarray) -> None:
    self.pending.append((codes.astype(np.int32), keys, values.astype(np.float32)))
    self.pending_rows += len(codes)
    if self.pending_rows > max(len(self.kept[0]), 1 << 20):
      self._compact()

  def _compact(self) -> None:
    parts = [self.kept, *self.pending]
    self.kept = _bottom_k(*(np.concatenate([p[i] for p in parts]) for i in range(3)), SKETCH_SIZE)
    self.pending, self.pending_rows = [], 0

  def result(self):
    self._compact()
    return self.kept


def index_file(file: int, path: str, shard_prefix: str, train_ids: np.ndarray | None,
               split_seed: int, split_fractions: Sequence[float], drop_duplicates: bool) -> _FileIndex | None:
  """Streams data file `path` into `<shard_prefix>.{codes,times,values,json}`; None when empty.
  `train_ids`: the training subjects from the split file, or None to hash-split."""
  path = pathlib.Path(path)
  stats = dict.fromkeys(STAT_KEYS, 0)
  parquet = meds_files.open_data_file(path)
  if parquet.metadata.num_rows == 0:
    return None
  codes: dict[str, int] = {}
  try:
    return _index_chunks(file, path, shard_prefix, _sorted_chunks(_batches(path, parquet, codes, stats), stats),
                         codes, stats, train_ids, split_seed, split_fractions, drop_duplicates)
  except _Unsorted:
    codes.clear()
    stats = dict.fromkeys(STAT_KEYS, 0)
    return _index_chunks(file, path, shard_prefix, _whole_file_chunk(path, codes, stats), codes, stats,
                         train_ids, split_seed, split_fractions, drop_duplicates)


def _index_chunks(file, path, shard_prefix, chunks, codes, stats, train_ids, split_seed, split_fractions,
                  drop_duplicates) -> _FileIndex:
  files = {name: open(f"{shard_prefix}.{name}", "wb") for name, _ in COLUMNS}
  index: dict[str, list] = {k: [] for k in ("subjects", "starts", "ends", "static", "first", "birth", "death",
                                             "duplicates", *CHECKSUMS)}
  counts = np.zeros(0, np.int64)
  sketch = _Sketch()
  written = 0
  try:
    for chunk in chunks:
      duplicates = duplicate_rows(chunk.subjects, chunk.times, chunk.codes, chunk.values)
      stats["duplicate_rows"] += int(duplicates.sum())
      duplicate_subjects, duplicate_counts = np.unique(chunk.subjects[duplicates], return_counts=True)
      if drop_duplicates and duplicates.any():
        keep = ~duplicates
        chunk = _Chunk(chunk.subjects[keep], chunk.times[keep], chunk.codes[keep], chunk.values[keep])
      rows = len(chunk.subjects)
      starts = np.flatnonzero(np.r_[True, chunk.subjects[1:] != chunk.subjects[:-1]])
      ends = np.r_[starts[1:], rows]
      for (name, dtype), column in zip(COLUMNS, (chunk.codes, chunk.times, chunk.values)):
        data = np.ascontiguousarray(column, dtype)
        files[name].write(data.tobytes())
        index[f"crc_{name}"].append(_range_checksums(data, starts, ends))
      static = chunk.times == NAT
      subjects = chunk.subjects[starts]
      per_subject = np.zeros(len(subjects), np.int64)
      per_subject[np.searchsorted(subjects, duplicate_subjects)] = duplicate_counts
      index["duplicates"].append(per_subject)
      index["subjects"].append(subjects)
      index["starts"].append(written + starts)
      index["ends"].append(written + ends)
      index["static"].append(np.add.reduceat(static, starts).astype(np.int64))
      timed_first = np.where(static, np.iinfo(np.int64).max, chunk.times)
      first = np.minimum.reduceat(timed_first, starts)
      index["first"].append(np.where(first == np.iinfo(np.int64).max, NAT, first))
      birth, death = codes.get(meds.birth_code, -1), codes.get(meds.death_code, -1)
      index["birth"].append(np.logical_or.reduceat(chunk.codes == birth, starts))
      index["death"].append(np.logical_or.reduceat(chunk.codes == death, starts))
      stats["rows"] += rows
      stats["static_rows"] += int(static.sum())
      stats["numeric_values"] += int((~np.isnan(chunk.values)).sum())
      # The training split's code counts and value sample.
      train_subjects = (np.isin(subjects, train_ids) if train_ids is not None
                        else _hash_train(subjects, split_seed, split_fractions))
      train_rows = np.repeat(train_subjects, ends - starts)
      counts = _add_counts(counts, np.bincount(chunk.codes[train_rows], minlength=len(codes)))
      valued = train_rows & np.isfinite(chunk.values)
      row_numbers = (written + np.flatnonzero(valued)).astype(np.uint64)
      keys = splits_lib.splitmix64(row_numbers ^ (np.uint64(file) << np.uint64(40)))
      sketch.add(chunk.codes[valued], keys, chunk.values[valued])
      written += rows
  finally:
    for f in files.values():
      f.close()
  with open(f"{shard_prefix}.json", "w") as f:
    json.dump(list(codes), f)
  cat = lambda name, dtype: np.concatenate(index[name]).astype(dtype) if index[name] else np.zeros(0, dtype)  # noqa: E731
  sketch_codes, sketch_keys, sketch_values = sketch.result()
  return _FileIndex(file=file, subjects=cat("subjects", np.int64), starts=cat("starts", np.int64),
                    ends=cat("ends", np.int64), static_rows=cat("static", np.int64),
                    first_times=cat("first", np.int64), has_birth=cat("birth", bool), has_death=cat("death", bool),
                    duplicates=cat("duplicates", np.int64),
                    checksums=np.stack([cat(c, np.uint32) for c in CHECKSUMS], axis=1),
                    codes=list(codes), training_counts=_add_counts(counts, np.zeros(len(codes), np.int64)),
                    sketch_codes=sketch_codes, sketch_keys=sketch_keys, sketch_values=sketch_values, stats=stats)


def _range_checksums(column: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
  """uint32 CRC-32 of each row range's bytes: the reader checks each record against it."""
  data = memoryview(column.tobytes())
  size = column.dtype.itemsize
  return np.array([zlib.crc32(data[a * size: b * size]) for a, b in zip(starts.tolist(), ends.tolist())], np.uint32)


def _add_counts(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  n = max(len(a), len(b))
  return np.pad(a, (0, n - len(a))) + np.pad(b, (0, n - len(b)))


def _hash_train(subjects: np.ndarray, seed: int, fractions: Sequence[float]) -> np.ndarray:
  return np.isin(subjects, splits_lib.hash_splits(subjects, fractions, seed).get(_TRAIN, ()))


# ================================================================ the whole store
ENGINES = ("processes", "beam")


def _index_and_save(job: tuple) -> int:
  """One data file indexed by a worker (a process of the pool, or of a Beam runner); its
  summary is saved beside its columns for the merge, as arrays and JSON (nothing pickled)."""
  part = index_file(*job)
  prefix = pathlib.Path(job[2])
  if part is None:
    _write_json(prefix.with_suffix(".summary.json"), {"empty": True})
    return job[0]
  arrays = {f.name: getattr(part, f.name) for f in dataclasses.fields(part)
            if isinstance(getattr(part, f.name), np.ndarray)}
  np.savez(prefix.with_suffix(".summary.npz"), **arrays)
  _write_json(prefix.with_suffix(".summary.json"), {"empty": False, "codes": part.codes, "stats": part.stats})
  return job[0]


def _load_part(prefix: pathlib.Path, file: int) -> _FileIndex | None:
  summary = json.loads(prefix.with_suffix(".summary.json").read_text())
  if summary["empty"]:
    return None
  with np.load(prefix.with_suffix(".summary.npz"), allow_pickle=False) as arrays:
    return _FileIndex(file=file, codes=summary["codes"], stats=summary["stats"], **{k: arrays[k] for k in arrays.files})


def _run_beam(jobs: list[tuple], workers: int, options: Sequence[str]) -> None:
  """Indexes the files on an Apache Beam runner: locally the DirectRunner with `workers`
  processes, or whatever `options` name (e.g. --runner=FlinkRunner ...; the output folder
  must then be one every worker mounts)."""
  import apache_beam as beam  # the `beam` extra: only this engine needs it
  from apache_beam.options.pipeline_options import PipelineOptions  # with it
  args = list(options) or ["--runner=DirectRunner", f"--direct_num_workers={workers}",
                           "--direct_running_mode=multi_processing" if workers > 1 else "--direct_running_mode=in_memory"]
  with beam.Pipeline(options=PipelineOptions(args)) as pipeline:
    _ = (pipeline | "files" >> beam.Create(jobs) | "one per worker" >> beam.Reshuffle()
         | "index" >> beam.Map(_index_and_save))


def build_event_store(meds_root: str | os.PathLike, out: str | os.PathLike, *, workers: int = 1,
                      drop_duplicates: bool = True, fallback_fractions: Sequence[float] = (0.8, 0.1, 0.1),
                      fallback_seed: int = 0, engine: str = "processes",
                      beam_options: Sequence[str] = ()) -> pathlib.Path:
  """Indexes the MEDS dataset at `meds_root` into an event store at `out` (see the module
  docstring); `workers` data files are read at once, each in its own process, by a process
  pool (`engine="processes"`) or an Apache Beam pipeline (`engine="beam"`). Both write the
  same store."""
  if engine not in ENGINES:
    raise ValueError(f"build_event_store: engine {engine!r}, expected one of {ENGINES}")
  root, out = pathlib.Path(meds_root), pathlib.Path(out)
  if (out / SOURCE_FILE).exists():
    raise FileExistsError(f"{out}: an event store is there already; choose a new folder")
  files = meds_files.find_data_files(root / meds.data_subdirectory)
  split_path = root / meds.subject_splits_filepath
  split_ids = meds_source.read_split_file(split_path) if split_path.exists() else None
  train_ids = None if split_ids is None else split_ids.get(_TRAIN, np.zeros(0, np.int64))
  with atomic_directory(out) as staging:
    (staging / "shards").mkdir()
    jobs = [(k, str(path), str(staging / "shards" / str(k)), train_ids, fallback_seed, tuple(fallback_fractions),
             drop_duplicates) for k, path in enumerate(files)]
    if engine == "beam":
      _run_beam(jobs, workers, beam_options)
    elif workers > 1:
      # Workers forked from a fork server, never from this process: it may run JAX's threads.
      context = multiprocessing.get_context("forkserver")
      with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        list(pool.map(_index_and_save, jobs))
    else:
      for job in jobs:
        _index_and_save(job)
    parts = [_load_part(staging / "shards" / str(k), k) for k in range(len(files))]
    stats, duplicates_by_file = _write_store(staging, root, files, [p for p in parts if p is not None], split_ids,
                                             fallback_fractions, fallback_seed, drop_duplicates)
    stats["empty_files"] = sum(p is None for p in parts)
    shards = {f"{k}.{name}": (staging / "shards" / f"{k}.{name}").stat().st_size
              for k, part in enumerate(parts) if part is not None for name, _ in COLUMNS}
    _write_json(staging / SOURCE_FILE, {
        "format": FORMAT, "format_version": FORMAT_VERSION, "meds_root": str(root.resolve()),
        "drop_duplicates": drop_duplicates,
        "files": [{"path": str(p.relative_to(root / meds.data_subdirectory)), **file_signature(p),
                   "duplicate_rows": int(duplicates_by_file.get(k, 0))} for k, p in enumerate(files)],
        "shards": shards, "stats": stats})
  log.info("event store %s: %s", out, ", ".join(f"{k}={v}" for k, v in stats.items()))
  return out


def _write_json(path: pathlib.Path, payload: Any) -> None:
  path.write_text(json.dumps(payload, indent=1))


def _write_store(staging: pathlib.Path, root: pathlib.Path, files: list[pathlib.Path], parts: list[_FileIndex],
                 split_ids: dict[str, np.ndarray] | None, fractions, seed,
                 drop_duplicates: bool) -> tuple[dict[str, int], dict[int, int]]:
  if not parts:
    raise ValueError(f"{root / meds.data_subdirectory}: all {len(files)} MEDS data file(s) have 0 rows")
  stats = dict.fromkeys(STAT_KEYS, 0)
  for part in parts:
    for key in ("rows", "static_rows", "numeric_values", "nan_values", "unsorted_files", "duplicate_rows"):
      stats[key] += part.stats[key]
  stats["files"] = len(files)
  # One code vocabulary over all files; each file keeps its local ids and a map to it.
  vocab: dict[str, int] = {}
  for part in parts:
    np.save(staging / "shards" / f"{part.file}.code_map.npy",
            np.array([vocab.setdefault(c, len(vocab)) for c in part.codes], np.int32))
  code_maps = {p.file: np.load(staging / "shards" / f"{p.file}.code_map.npy") for p in parts}

  cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
  checksums = cat("checksums")
  table = {"subject_id": cat("subjects"), "file": np.concatenate([np.full(len(p.subjects), p.file, np.int32)
                                                                    for p in parts]),
           "start": cat("starts"), "end": cat("ends"), "static_rows": cat("static_rows"),
           "first_time": cat("first_times"), "has_birth": cat("has_birth"), "has_death": cat("has_death"),
           "duplicate_rows": cat("duplicates"),
           **{name: checksums[:, c] for c, name in enumerate(CHECKSUMS)}}
  order = np.lexsort((table["file"], table["subject_id"]))
  table = {k: v[order] for k, v in table.items()}
  subject_ids = np.unique(table["subject_id"])
  train = (np.isin(subject_ids, split_ids.get(_TRAIN, ())) if split_ids is not None
           else _hash_train(subject_ids, seed, fractions))
  cross = store_duplicates.cross_file_duplicates(staging, table, code_maps, train[np.searchsorted(subject_ids, table["subject_id"])])
  table["duplicate_rows"] = table["duplicate_rows"] + cross.rows
  table["dropped_rows"] = cross.rows if drop_duplicates else np.zeros_like(cross.rows)
  table["dropped_static"] = cross.static if drop_duplicates else np.zeros_like(cross.static)
  stats["duplicate_rows"] += int(cross.rows.sum())
  if drop_duplicates:
    stats["rows"] -= int(cross.rows.sum())
    stats["static_rows"] -= int(cross.static.sum())
    stats["numeric_values"] -= int(np.isfinite(cross.values).sum())

  counts = np.zeros(len(vocab), np.int64)
  for part in parts:
    np.add.at(counts, code_maps[part.file][: len(part.training_counts)], part.training_counts)
  if drop_duplicates:  # what the store drops is not trained on: not counted, not sampled
    counts -= np.bincount(cross.codes[cross.train], minlength=len(vocab))
  _write_json(staging / "training_codes.json", {"codes": list(vocab), "counts": counts.tolist()})
  sampled = [store_duplicates.without_dropped(p, cross if drop_duplicates else None) for p in parts]
  sketch = _bottom_k(np.concatenate([code_maps[p.file][s[0]] for p, s in zip(parts, sampled)]),
                     np.concatenate([s[1] for s in sampled]), np.concatenate([s[2] for s in sampled]), SKETCH_SIZE)
  (staging / "value_sketch").mkdir()
  np.save(staging / "value_sketch" / "codes.npy", sketch[0])
  np.save(staging / "value_sketch" / "values.npy", sketch[2])

  stats["subjects"] = len(subject_ids)
  stats["codes"] = len(vocab)
  stats["subjects_in_multiple_files"] = len(table["subject_id"]) - len(subject_ids)
  per_subject = lambda values, fn: fn.reduceat(values, np.searchsorted(table["subject_id"], subject_ids))  # noqa: E731
  rows = table["end"] - table["start"]
  stats["static_only_subjects"] = int((per_subject(rows - table["static_rows"], np.add) == 0).sum())
  stats["subjects_without_birth"] = int((~per_subject(table["has_birth"], np.logical_or)).sum())
  stats["subjects_with_death"] = int(per_subject(table["has_death"], np.logical_or).sum())
  split_of = np.full(len(subject_ids), "", object)
  if split_ids is None:
    stats["fallback_split"] = 1
    assigned = splits_lib.hash_splits(subject_ids, fractions, seed)
  else:
    assigned = {}
    for name, ids in split_ids.items():
      has_events = np.isin(ids, subject_ids, assume_unique=True)
      stats["split_subjects_without_events"] += int((~has_events).sum())
      assigned[name] = ids[has_events]
    meds_source.check_split_file_matches(root / meds.subject_splits_filepath,
                                         sum(len(v) for v in assigned.values()), len(subject_ids))
  for name, ids in assigned.items():
    split_of[np.searchsorted(subject_ids, ids)] = name
  stats["subjects_without_split"] = int((split_of == "").sum())
  table["split"] = split_of[np.searchsorted(subject_ids, table["subject_id"])]
  pq.write_table(pa.table({k: pa.array(v.tolist() if k == "split" else v) for k, v in table.items()}),
                 staging / "index.parquet")
  by_file = np.bincount(table["file"], weights=table["duplicate_rows"], minlength=len(files)).astype(np.int64)
  return stats, dict(enumerate(by_file.tolist()))
