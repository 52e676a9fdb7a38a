"""Random-access reader for FASTA files of DNA or protein sequences.

This module owns turning one FASTA file (plain or .gz) or a folder of them into records a
Grain pipeline can index, without holding the sequences in memory:

  dataset = FastaDataset("genes.fa.gz", alphabet="dna", label_pattern=r"motif=(\\d+)")
  source = dataset.source("train")   # picklable random-access sequence
  record = source[0]   # {"id": str, "sequence": str (upper case), "labels": float32 [L]}

One pass over the files at start-up validates every line and builds an index: per record
the file, the byte offsets of its sequence lines, its residue count, its header line and
id. A record is then read with one positioned read. In a .gz file the offsets are in the
decompressed stream and a read seeks there, which decompresses from the start of the file
on every backward seek: fine for small files, slow for large ones read in shuffled order
(decompress those first).

Format: `>id description` headers (the id is the first word), sequences over any number of
lines, blank lines and surrounding whitespace ignored, lower case (soft-masked repeats)
read as upper case and counted. Alphabets:

* "dna": A C G T N; the IUPAC ambiguity codes R Y S W K M B D H V are read as N. N and
  those codes are counted as ambiguous residues.
* "protein": the 20 standard amino acids, X B Z (ambiguous) and U O (selenocysteine,
  pyrrolysine), all kept as they are and counted.

Anything else (a gap "-", a stop "*", a digit, RNA's U in a DNA file) is an error naming
the file, line, column and character. So is a sequence line before the first header, a
record with no sequence, an empty id and an id seen before (naming both lines).

Splits: by `splits.hash_split_buckets` over the record ids, or with split_from_header by a
`split=NAME` word in each header (records without one are in no split, and counted).
Labels: `label_pattern` is a regex with one group searched in each header (for example
`motif=(\\d+)`); a header it does not match has a NaN label, counted; a match that is not a
number is an error naming the line.
"""
from __future__ import annotations

import gzip
import logging
import os
import pathlib
import re
import threading
from typing import Sequence

import numpy as np

from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.data.sources.indexing import checked_index

log = logging.getLogger(__name__)

ALPHABETS = ("dna", "protein")
FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".faa", ".frn", ".fas")
_WHITESPACE = b" \t\r\n\v\f"
_DNA_BASES = b"ACGTN"
_IUPAC_AMBIGUITY = b"RYSWKMBDHV"
AMINO_ACIDS = b"ACDEFGHIKLMNPQRSTVWY"
AMBIGUOUS_AMINO_ACIDS = b"XBZ"
RARE_AMINO_ACIDS = b"UO"
_LOWERCASE = bytes(range(ord("a"), ord("z") + 1))
_TO_N = bytes.maketrans(_IUPAC_AMBIGUITY, b"N" * len(_IUPAC_AMBIGUITY))
_SPLIT_WORD = re.compile(r"(?:^|\s)split=(\S+)")

# Every key of FastaDataset.stats (ints, safe to log).
STAT_KEYS = (
    "files", "records", "residues", "min_length", "max_length",
    "ambiguous_residues",  # dna: N and IUPAC codes; protein: X, B, Z
    "records_with_ambiguity",
    "iupac_codes_as_n",  # dna: residues of R Y S W K M B D H V read as N
    "rare_residues",  # protein: U (selenocysteine) and O (pyrrolysine)
    "lowercase_residues",  # soft-masked residues, read as upper case
    "records_without_label",  # label_pattern did not match the header (label NaN)
    "fallback_split",  # 1 when the hash of the ids decided the splits
    "records_without_split",  # split_from_header and no split= word: in no split
)


def _alphabet_bytes(alphabet: str) -> tuple[bytes, bytes]:
  """(every accepted residue in upper case, the ambiguous ones among them)."""
  if alphabet == "dna":
    return _DNA_BASES + _IUPAC_AMBIGUITY, b"N" + _IUPAC_AMBIGUITY
  if alphabet == "protein":
    return AMINO_ACIDS + AMBIGUOUS_AMINO_ACIDS + RARE_AMINO_ACIDS, AMBIGUOUS_AMINO_ACIDS
  raise ValueError(f"FASTA alphabet {alphabet!r}, expected one of {ALPHABETS}")


def normalise_residues(raw: bytes, alphabet: str) -> bytes:
  """Sequence lines as stored -> the record's sequence: no whitespace, upper case, and
  for DNA the IUPAC ambiguity codes read as N."""
  residues = raw.translate(None, _WHITESPACE).upper()
  return residues.translate(_TO_N) if alphabet == "dna" else residues


def fasta_files(path: pathlib.Path) -> list[pathlib.Path]:
  """The file itself, or the FASTA files (plain or .gz) of a folder in sorted order."""
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and p.name.lower().removesuffix(".gz").endswith(FASTA_SUFFIXES))
    if not files:
      raise ValueError(f"{path}: folder holds no FASTA files; expected names ending in one "
                       f"of {FASTA_SUFFIXES} (optionally .gz)")
    return files
  if not path.is_file():
    raise ValueError(f"{path}: does not exist; expected a FASTA file or a folder of them")
  return [path]


def _open(path: pathlib.Path):
  return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


class _Index:
  """Growing per-record columns, filled by `_scan_file`."""

  def __init__(self):
    self.file, self.start, self.end, self.length, self.line = [], [], [], [], []
    self.ids: list[str] = []
    self.headers: list[str] = []
    self.first_line: dict[str, tuple[pathlib.Path, int]] = {}


class _Scan:
  """State of one record while its lines are read."""

  def __init__(self, path: pathlib.Path, line: int, header: str, start: int):
    self.path, self.line, self.header, self.start = path, line, header, start
    self.id = header.split(maxsplit=1)[0] if header.strip() else ""
    self.residues = self.ambiguous = 0


def _header_text(path: pathlib.Path, line_no: int, line: bytes) -> str:
  try:
    return line[1:].decode("utf-8").strip()
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}, line {line_no}: header is not UTF-8 text ({e.reason})") from None


def _bad_character(path: pathlib.Path, line_no: int, line: bytes, accepted: bytes,
                   alphabet: str) -> ValueError:
  ok = set(accepted + accepted.lower() + _WHITESPACE)
  column = next(i for i, b in enumerate(line) if b not in ok)
  char = chr(line[column])
  return ValueError(f"{path}, line {line_no}, column {column + 1}: character {char!r} is not "
                    f"in the {alphabet} alphabet; expected one of {accepted.decode()} "
                    f"(either case)")


def _scan_file(path: pathlib.Path, file_index: int, alphabet: str, index: _Index,
               stats: dict[str, int]) -> None:
  """Validates every line of `path` and appends its records to `index`."""
  accepted, ambiguous = _alphabet_bytes(alphabet)
  deletable = _WHITESPACE + accepted + accepted.lower()
  ambiguous_both = ambiguous + ambiguous.lower()
  iupac_both = _IUPAC_AMBIGUITY + _IUPAC_AMBIGUITY.lower()
  rare_both = RARE_AMINO_ACIDS + RARE_AMINO_ACIDS.lower()
  record: _Scan | None = None
  offset = 0

  def finish(end: int) -> None:
    if record is None:
      return
    where = f"{record.path}, line {record.line}"
    if not record.id:
      raise ValueError(f"{where}: header has no id; expected '>id description'")
    if not record.residues:
      raise ValueError(f"{where}: record {record.id!r} has an empty sequence; expected at "
                       f"least one residue before the next header or the end of the file")
    if record.id in index.first_line:
      first_path, first_line = index.first_line[record.id]
      raise ValueError(f"{where}: duplicate id {record.id!r}, first seen at {first_path}, "
                       f"line {first_line}; expected unique record ids")
    index.first_line[record.id] = (record.path, record.line)
    index.file.append(file_index)
    index.start.append(record.start)
    index.end.append(end)
    index.length.append(record.residues)
    index.line.append(record.line)
    index.ids.append(record.id)
    index.headers.append(record.header)
    stats["ambiguous_residues"] += record.ambiguous
    stats["records_with_ambiguity"] += record.ambiguous > 0

  try:
    with _open(path) as handle:
      for line_no, line in enumerate(handle, 1):
        if line.startswith(b">"):
          finish(offset)
          record = _Scan(path, line_no, _header_text(path, line_no, line), offset + len(line))
        elif line.strip():
          if record is None:
            raise ValueError(f"{path}, line {line_no}: sequence before the first header; "
                             f"expected a '>id' line first")
          if line.translate(None, deletable):
            raise _bad_character(path, line_no, line, accepted, alphabet)
          body = line.translate(None, _WHITESPACE)
          record.residues += len(body)
          record.ambiguous += len(body) - len(body.translate(None, ambiguous_both))
          if alphabet == "dna":
            stats["iupac_codes_as_n"] += len(body) - len(body.translate(None, iupac_both))
          else:
            stats["rare_residues"] += len(body) - len(body.translate(None, rare_both))
          stats["lowercase_residues"] += len(body) - len(body.translate(None, _LOWERCASE))
        offset += len(line)
      finish(offset)
  except (OSError, EOFError, gzip.BadGzipFile) as e:
    raise ValueError(f"{path}: cannot read ({e})") from None


def _parse_labels(index: _Index, pattern: re.Pattern | None, files: Sequence[pathlib.Path],
                  stats: dict[str, int]) -> np.ndarray:
  if pattern is None:
    return np.zeros((len(index.ids), 0), np.float32)
  labels = np.full((len(index.ids), 1), np.nan, np.float32)
  for i, header in enumerate(index.headers):
    match = pattern.search(header)
    if match is None or match.group(1) is None:
      stats["records_without_label"] += 1
      continue
    try:
      labels[i, 0] = float(match.group(1))
    except ValueError:
      raise ValueError(f"{files[index.file[i]]}, line {index.line[i]}: label "
                       f"{match.group(1)!r} of record {index.ids[i]!r} is not a number; "
                       f"expected label_pattern {pattern.pattern!r} to capture one") from None
  return labels


def label_name(pattern: str) -> str:
  """`motif=(\\d+)` -> "motif"; "label" when the pattern does not start with `name=`."""
  match = re.match(r"([A-Za-z_][A-Za-z0-9_]*)=", pattern)
  return match.group(1) if match else "label"


# ---------------------------------------------------------------- public API
class FastaSource:
  """The records of one split, read lazily; picklable (file handles reopen in workers).

  Attributes: ids (list of str), lengths int64 [records] (residues), labels float32
  [records, L] (NaN = missing), label_names.
  """

  def __init__(self, files: Sequence[pathlib.Path], alphabet: str, file_index: np.ndarray,
               starts: np.ndarray, ends: np.ndarray, lengths: np.ndarray,
               ids: Sequence[str], labels: np.ndarray, label_names: Sequence[str]):
    self.files, self.alphabet = [str(f) for f in files], alphabet
    self._file_index, self._starts, self._ends = file_index, starts, ends
    self.lengths, self.ids, self.labels = lengths, list(ids), labels
    self.label_names = tuple(label_names)
    self._handles: dict[int, object] = {}
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    state["_handles"], state["_lock"] = {}, None  # open files and locks stay in their process
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.ids)

  @property
  def record_keys(self) -> list[str]:
    """Each record's FASTA id."""
    return list(self.ids)

  def _read(self, file: int, start: int, size: int) -> bytes:
    path = self.files[file]
    with self._lock:  # Grain reads with several threads
      handle = self._handles.get(file)
      if handle is None:
        gz = path.lower().endswith(".gz")
        handle = gzip.open(path, "rb") if gz else os.open(path, os.O_RDONLY)
        self._handles[file] = handle
      if not isinstance(handle, int):  # a gzip stream has one position: read under the lock
        handle.seek(start)
        return handle.read(size)
    return os.pread(handle, size, start)  # positioned: threads need no lock

  def __getitem__(self, index: int) -> dict:
    i = checked_index(index, len(self), "FastaSource ... records")
    file, start = int(self._file_index[i]), int(self._starts[i])
    raw = self._read(file, start, int(self._ends[i]) - start)
    residues = normalise_residues(raw, self.alphabet)
    if len(residues) != self.lengths[i]:
      raise ValueError(f"{self.files[file]}: record {self.ids[i]!r} has {len(residues)} "
                       f"residues, the index {int(self.lengths[i])}; the file changed after "
                       f"it was indexed")
    return {"id": self.ids[i], "sequence": residues.decode("ascii"),
            "labels": self.labels[i].copy()}

  def close(self) -> None:
    with self._lock:
      for handle in self._handles.values():
        if isinstance(handle, int):
          os.close(handle)
        else:
          handle.close()
      self._handles = {}

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001  (interpreter shutdown)
      pass

  def __repr__(self) -> str:
    return f"FastaSource(records={len(self)}, alphabet={self.alphabet!r})"


class FastaDataset:
  """An indexed FASTA file or folder, with its splits, labels and stats.

  Attributes:
    path: the file or folder; files: the FASTA files read, in order.
    ids: record ids in file order; lengths: int64 residues per record.
    splits: split name -> int64 record indices (STANDARD_SPLITS first, then custom names).
    labels: float32 [records, L]; label_names: (name,) when label_pattern is set, else ().
    stats: counts only (the keys of STAT_KEYS), safe to log.
  """

  def __init__(self, path: str | os.PathLike, *, alphabet: str, split_from_header: bool = False,
               label_pattern: str | None = None,
               fallback_fractions: Sequence[float] = (0.8, 0.1, 0.1), fallback_seed: int = 0):
    _alphabet_bytes(alphabet)  # raises on an unknown alphabet before any reading
    pattern = re.compile(label_pattern) if label_pattern else None
    if pattern is not None and pattern.groups != 1:
      raise ValueError(f"FASTA label_pattern {label_pattern!r} has {pattern.groups} groups; "
                       f"expected exactly one, capturing the label (e.g. 'motif=(\\d+)')")
    self.path, self.alphabet = pathlib.Path(path), alphabet
    self.files = fasta_files(self.path)
    self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
    self.stats["files"] = len(self.files)
    index = _Index()
    for file_index, file in enumerate(self.files):
      _scan_file(file, file_index, alphabet, index, self.stats)
    if not index.ids:
      raise ValueError(f"{self.path}: no FASTA records; expected at least one '>id' header")
    self.ids = index.ids
    self._file_index = np.asarray(index.file, np.int32)
    self._starts = np.asarray(index.start, np.int64)
    self._ends = np.asarray(index.end, np.int64)
    self.lengths = np.asarray(index.length, np.int64)
    self.labels = _parse_labels(index, pattern, self.files, self.stats)
    self.label_names = (label_name(label_pattern),) if pattern is not None else ()
    self.splits = (self._header_splits(index.headers) if split_from_header
                   else self._hash_splits(fallback_fractions, fallback_seed))
    s = self.stats
    s["records"], s["residues"] = len(self.ids), int(self.lengths.sum())
    s["min_length"], s["max_length"] = int(self.lengths.min()), int(self.lengths.max())
    log.info("FASTA %s: %s", self.path, ", ".join(f"{k}={v}" for k, v in s.items()))

  def _hash_splits(self, fractions: Sequence[float], seed: int) -> dict[str, np.ndarray]:
    self.stats["fallback_split"] = 1
    buckets = splits_lib.hash_split_buckets(np.asarray(self.ids, dtype=object), fractions, seed)
    return {name: np.flatnonzero(buckets == i).astype(np.int64)
            for i, name in enumerate(splits_lib.STANDARD_SPLITS)}

  def _header_splits(self, headers: Sequence[str]) -> dict[str, np.ndarray]:
    names = []
    for header in headers:
      match = _SPLIT_WORD.search(header)
      names.append(match.group(1) if match else None)
    self.stats["records_without_split"] = names.count(None)
    present = {n for n in names if n is not None}
    order = splits_lib.ordered(present)
    names = np.asarray(names, dtype=object)
    return {name: np.flatnonzero(names == name).astype(np.int64) for name in order}

  def source(self, split: str) -> FastaSource:
    """The records of `split`, in file order."""
    if split not in self.splits:
      raise ValueError(f"{self.path}: unknown split {split!r}; available splits: "
                       f"{list(self.splits)}")
    rows = self.splits[split]
    return FastaSource(self.files, self.alphabet, self._file_index[rows], self._starts[rows],
                       self._ends[rows], self.lengths[rows], [self.ids[i] for i in rows],
                       self.labels[rows], self.label_names)

  def __repr__(self) -> str:
    return (f"FastaDataset({str(self.path)!r}, alphabet={self.alphabet!r}, "
            f"records={self.stats['records']}, "
            f"splits={ {k: len(v) for k, v in self.splits.items()} })")
