"""WFDB ECG records as a random-access source, indexed from their headers.

`ECGDataset(path, leads=...)` takes a folder (scanned recursively for `.hea` headers; a
record's subject is its record name) or a manifest CSV with `subject_id`, `path` (the
record's `.hea`, or its name without extension, relative to the CSV) and optional `split`
and numeric label columns. Splits come from the manifest's `split` column, else from the
shared subject hash (`data/sources/splits.py`), so a subject's ECGs share the split of
its EHR.

Indexing reads headers only (`wfdb.rdheader`) and checks what it can there: a readable
header with a sampling rate, a storage format `wfdb` reads, each signal file present and
long enough for the header's sample count, and at least one configured lead. Reading
(`wfdb.rdrecord`) checks the samples themselves: no NaN or infinity. `on_error="raise"`
turns the first problem into a ValueError naming the file, the record and the field;
`on_error="skip"` drops records failing at indexing (counted per reason in `stats`, the
first few named in the log) and replaces a record failing at read time by the next readable
one of its split, naming it in the run's skipped.csv (`data/sources/read_skips.py`).

A record item: `signal` float32 [samples, leads] in physical units (mV) in the configured
lead order, zero for leads the record lacks; `lead_present` bool [leads]; `fs` (Hz);
`subject_id`, `path`, `labels` float32 [K] (NaN where missing), `readable`.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from typing import Sequence

import numpy as np
import wfdb

from biofm_jax.data.sources import read_skips
from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.data.sources.indexing import checked_index
from biofm_jax.data.sources.manifest import ACQUISITION_TIME, acquisition_time, read_manifest

log = logging.getLogger(__name__)

# Bits per sample of the WFDB storage formats `wfdb` reads (310/311 pack 3 samples in 4 bytes).
BITS_PER_SAMPLE = {"8": 8, "16": 16, "24": 24, "32": 32, "61": 16, "80": 8, "160": 16, "212": 12,
                   "310": 32 / 3, "311": 32 / 3}
SKIP_REASONS = ("header", "format", "missing", "truncated", "leads")
_NAMED_SKIPS = 5  # files named in the skip warning


def lead_key(name: str) -> str:
  """Lead names compare case-insensitively ("AVR" is "aVR")."""
  return name.strip().lower()


@dataclasses.dataclass(frozen=True)
class Record:
  subject_id: str
  path: str  # the record's path without extension (as wfdb names records)
  split: str
  labels: tuple[float, ...]
  fs: float = 0.0
  num_samples: int = 0
  channels: tuple[int, ...] = ()  # per configured lead: its signal index in the file, -1 if absent
  acquisition_time: object = None  # np.datetime64 from the manifest's acquisition_time, None: unknown


class RecordError(ValueError):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def _signal_bytes(header) -> dict[str, int]:
  """{signal file: bytes the header's sample count needs}."""
  need: dict[str, float] = {}
  for fmt, file_name, offset in zip(header.fmt, header.file_name, header.byte_offset or [None] * header.n_sig):
    need[file_name] = need.get(file_name, float(offset or 0)) + header.sig_len * BITS_PER_SAMPLE[fmt] / 8
  return {name: math.ceil(size) for name, size in need.items()}


def inspect_record(record: Record, leads: Sequence[str]) -> Record:
  """The record with its header's facts, or a RecordError naming file, field and reason."""
  hea = f"{record.path}.hea"
  try:
    header = wfdb.rdheader(record.path)
  except Exception as e:  # wfdb raises many kinds for a bad header; all mean the same here
    kind = "missing" if not os.path.exists(hea) else "header"
    raise RecordError(kind, f"{hea}: cannot read the WFDB header ({type(e).__name__}: {e})") from None
  if not header.fs or header.fs <= 0 or not header.sig_len or not header.n_sig:
    raise RecordError("header", f"{hea}: header gives fs={header.fs}, sig_len={header.sig_len}, "
                                f"n_sig={header.n_sig}; expected a sampling rate and samples")
  unknown = sorted({f for f in header.fmt if f not in BITS_PER_SAMPLE})
  if unknown:
    raise RecordError("format", f"{hea}: field 'fmt' is {unknown}; formats read: {sorted(BITS_PER_SAMPLE, key=int)}")
  folder = pathlib.Path(record.path).parent
  for file_name, need in _signal_bytes(header).items():
    data = folder / file_name
    if not data.is_file():
      raise RecordError("missing", f"{hea}: signal file {data} does not exist")
    size = data.stat().st_size
    if size < need:
      raise RecordError("truncated", f"{data}: {size} bytes, but the header's sig_len={header.sig_len} for "
                                     f"{header.n_sig} signals needs {need}")
  names = [lead_key(n) for n in header.sig_name]
  channels = tuple(names.index(lead_key(lead)) if lead_key(lead) in names else -1 for lead in leads)
  if all(c < 0 for c in channels):
    raise RecordError("leads", f"{hea}: field 'sig_name' is {list(header.sig_name)}; none of the configured "
                               f"leads {list(leads)}")
  return dataclasses.replace(record, fs=float(header.fs), num_samples=int(header.sig_len), channels=channels)


def _scan_folder(root: pathlib.Path) -> list[Record]:
  return [Record(subject_id=hea.stem, path=str(hea.with_suffix("")), split="", labels=())
          for hea in sorted(root.rglob("*.hea")) if not any(p.startswith(".") for p in hea.parts)]


def _read_manifest(csv_path: pathlib.Path) -> tuple[list[Record], tuple[str, ...]]:
  rows, label_names, columns = read_manifest(csv_path, reserved=("split", ACQUISITION_TIME))
  dated = ACQUISITION_TIME in columns
  return [Record(subject_id=row.subject_id, path=str(row.path.with_suffix("") if row.path.suffix == ".hea" else row.path),
                 split=row.fields["split"], labels=row.labels,
                 acquisition_time=acquisition_time(csv_path, row.line, row.fields[ACQUISITION_TIME]) if dated else None)
          for row in rows], label_names


class ECGSource:
  """One split's records; an item is read from disk when asked for (see the module docstring)."""

  def __init__(self, records: Sequence[Record], leads: Sequence[str], on_error: str, num_labels: int,
               skip_file: str = ""):
    self.records, self.leads, self.on_error, self.num_labels = list(records), tuple(leads), on_error, num_labels
    self.subject_ids = [r.subject_id for r in self.records]
    self.paths, self.skip_file = [r.path for r in self.records], skip_file
    self._known_bad = read_skips.listed(skip_file)  # named by an earlier read: not read again

  def record_times(self) -> np.ndarray | None:
    """Each record's acquisition time (datetime64[us]), or None where the manifest gives none."""
    if all(r.acquisition_time is None for r in self.records):
      return None
    return np.array([r.acquisition_time for r in self.records], "datetime64[us]")

  def __len__(self) -> int:
    return len(self.records)

  @property
  def record_keys(self) -> list[str]:
    """Each record's header file, as the manifest or folder scan named it."""
    return [str(p) for p in self.paths]

  @property
  def labels(self) -> np.ndarray:
    return np.array([r.labels for r in self.records], np.float32).reshape(len(self.records), self.num_labels)

  def __getitem__(self, index: int) -> dict:
    i = checked_index(index, len(self.records), "ECGSource ... records")
    return read_skips.read_or_replace(i, self.paths, self._read, on_error=self.on_error, skip_file=self.skip_file,
                                      known_bad=self._known_bad)

  def _read(self, i: int) -> dict:
    record = self.records[i]
    present = np.array([c >= 0 for c in record.channels], bool)
    signal = np.zeros((record.num_samples, len(self.leads)), np.float32)
    signal[:, present] = read_signal(record)
    return {"subject_id": record.subject_id, "path": record.path, "signal": signal, "lead_present": present,
            "fs": np.float32(record.fs), "labels": np.asarray(record.labels, np.float32), "readable": True}

  def __repr__(self) -> str:
    return f"ECGSource(records={len(self)}, leads={len(self.leads)})"


def read_signal(record: Record) -> np.ndarray:
  """float32 [samples, present leads] in physical units; ValueError naming the record and
  lead when reading fails or a sample is NaN or infinite."""
  channels = [c for c in record.channels if c >= 0]
  try:
    signal = wfdb.rdrecord(record.path, channels=channels, physical=True).p_signal
  except Exception as e:  # a file changed since indexing, or bytes wfdb cannot decode
    raise ValueError(f"{record.path}.dat: cannot read the samples ({type(e).__name__}: {e})") from None
  signal = np.asarray(signal, np.float32)
  if signal.shape != (record.num_samples, len(channels)):
    raise ValueError(f"{record.path}.dat: field 'signal' has shape {list(signal.shape)}, the header says "
                     f"{[record.num_samples, len(channels)]}")
  bad = ~np.isfinite(signal)
  if bad.any():
    sample, lead = np.argwhere(bad)[0]
    raise ValueError(f"{record.path}.dat: field 'signal' is not finite ({signal[sample, lead]}) at sample "
                     f"{int(sample)} of signal {channels[int(lead)]}; {int(bad.sum())} such samples")
  return signal


class ECGDataset:
  """The records under `path` (a folder or a manifest CSV), checked and split."""

  def __init__(self, path: str | os.PathLike, *, leads: Sequence[str], on_error: str = "raise",
               split_seed: int = 0, fallback_fractions: Sequence[float] = (0.8, 0.1, 0.1), skip_file: str = ""):
    self.skip_file = skip_file  # read-time skips (`data/sources/read_skips.py`)
    if on_error not in ("raise", "skip"):
      raise ValueError(f"ECGDataset: on_error={on_error!r}; expected 'raise' or 'skip'")
    self.path, self.leads, self.on_error = pathlib.Path(path), tuple(leads), on_error
    if self.path.is_dir():
      candidates, self.label_names = _scan_folder(self.path), ()
    elif self.path.is_file() and self.path.suffix.lower() == ".csv":
      candidates, self.label_names = _read_manifest(self.path)
    else:
      raise FileNotFoundError(f"ecg path {self.path}: expected a folder of WFDB records or a manifest .csv")
    self.stats = {f"skipped_{r}": 0 for r in SKIP_REASONS}
    records, skipped = [], []
    for candidate in candidates:
      try:
        records.append(inspect_record(candidate, self.leads))
      except RecordError as e:
        if on_error == "raise":
          raise ValueError(f"{e} (on_error='skip' drops such records)") from None
        self.stats[f"skipped_{e.reason}"] += 1
        skipped.append(str(e))
    if not records:
      raise ValueError(f"ecg path {self.path}: no readable WFDB records ({len(candidates)} found, "
                       f"{len(skipped)} skipped){': ' + skipped[0] if skipped else ''}")
    self.stats["skipped"] = len(skipped)
    if skipped:
      log.warning("ecg %s: skipped %d record(s) (%s); first: %s", self.path, len(skipped),
                  ", ".join(f"{r}={self.stats[f'skipped_{r}']}" for r in SKIP_REASONS if self.stats[f"skipped_{r}"]),
                  " | ".join(skipped[:_NAMED_SKIPS]))
    self.records = records
    self.splits = self._splits(split_seed, fallback_fractions)
    self.stats.update(records=len(records), leads_missing=int(sum(c < 0 for r in records for c in r.channels)),
                      sampling_rates=len({r.fs for r in records}))

  def _splits(self, seed: int, fractions: Sequence[float]) -> dict[str, np.ndarray]:
    """Split name -> record indices: the manifest's split where given, else the subject hash."""
    subjects = np.array([r.subject_id for r in self.records], dtype=object)
    buckets = splits_lib.hash_split_buckets(subjects, fractions, seed)
    names = np.array([r.split or splits_lib.STANDARD_SPLITS[b] for r, b in zip(self.records, buckets)], dtype=object)
    split_of: dict[str, str] = {}
    for record, name in zip(self.records, names):
      if split_of.setdefault(record.subject_id, name) != name:
        raise ValueError(f"{self.path}: subject {record.subject_id!r} is in splits {split_of[record.subject_id]!r} "
                         f"and {name!r}; a subject must stay in one split")
    order = splits_lib.ordered(set(names))
    return {s: np.flatnonzero(names == s).astype(np.int64) for s in order}

  def source(self, split: str) -> ECGSource:
    if split not in self.splits:
      raise ValueError(f"ecg {self.path}: no split {split!r}; splits: {list(self.splits)}")
    return ECGSource([self.records[i] for i in self.splits[split]], self.leads, self.on_error,
                     len(self.label_names), self.skip_file)
