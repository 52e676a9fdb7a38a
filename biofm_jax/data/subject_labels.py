"""Subject-keyed labels over the multimodal join: which joined subject each label row is, and
what of it the row may use.

A fused model's labels table has one row per subject (`subject_id` and the outcome), or rows
with a `prediction_time` (`meds.LabelSchema`: a subject may have several, at different
times). A row with a prediction time sees each *timed* modality (one whose source cuts a
record at a time, `record_until`: EHR) only up to that time, by the task's cut ("inclusive":
events at or before it, as MEDS defines; "strict": before it), exactly as EHR fine-tuning cuts
its records. Of a *dated* modality (one whose source gives each record an acquisition time,
`record_times`: images and ECGs from a manifest with an `acquisition_time` column, DICOM
images by their headers' dates) the row reads only the records the same cut keeps, the most
recent first (the one evaluation reads); a record of a dated modality whose own time is
unknown (a DICOM file with its dates blanked) is never read by a timed row. The other
modalities (those without times: expression, tables, undated image files) are read whole.
A timed or dated modality with nothing the cut keeps is absent from that row, and a row
left with no modality at all is dropped and counted.

`match_subject_labels` gives per split the label rows found there and, for each, the join
item it reads and what `TimedItems` adds to that item: the prediction time, the cut and
the modalities absent at that time. `JoinModalities` (`multimodal.py`) does the cutting.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from biofm_jax.data.join_examples import INCLUSIVE, PREDICTION_TIME

CUTS = ("inclusive", "strict")


@dataclasses.dataclass(frozen=True)
class SubjectRows:
  """The label rows of one split: `rows` (indices into the labels), the join `items` they
  read, their prediction times (NaT: none), the timed and dated modalities absent at that
  time, and for each row the records of each dated modality it may read (latest first)."""
  rows: np.ndarray
  items: np.ndarray
  times: np.ndarray
  absent: tuple[tuple[str, ...], ...]
  dated_records: tuple[dict[str, tuple[int, ...]], ...] = ()


def timed_and_dated(joined: Any, split: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """({modality: its source of `split`} for the joined modalities whose records have event
  times, {modality: each record's acquisition time} for those whose source dates them)."""
  sources = {m: module.source(split) for m, module in joined.modules.items()}
  timed = {m: s for m, s in sources.items() if hasattr(s, "record_until") and hasattr(s, "first_event_times")}
  times = {m: s.record_times() for m, s in sources.items() if hasattr(s, "record_times")}
  return timed, {m: np.asarray(t, "datetime64[us]") for m, t in times.items() if t is not None}


def _made_by(times: np.ndarray, records, time: np.datetime64, cut: str) -> tuple[int, ...]:
  """The records made at or before `time` ("inclusive"; "strict": before), latest first."""
  kept = [int(r) for r in records if (times[r] <= time if cut == "inclusive" else times[r] < time)]
  return tuple(sorted(kept, key=lambda r: times[r], reverse=True))


def match_subject_labels(joined: Any, labels: Any, splits: Sequence[str], *, cut: str = "inclusive",
                         ) -> tuple[dict[str, SubjectRows], dict[str, int]]:
  """({split: its rows}, counts) of `labels` (`data/labels.Labels`) over the multimodal join
  `joined`. Rows of subjects in no split, and timed rows with nothing to read before their
  time, are counted, not matched."""
  if cut not in CUTS:
    raise ValueError(f"task.prediction_time_cut {cut!r}: expected one of {CUTS}")
  times = np.asarray(labels.prediction_times, "datetime64[us]")
  timed = ~np.isnat(times)  # all or none (`read_labels` refuses a null time in a prediction_time column)
  # Subject ids compare as text: the join keeps each modality's ids as strings (MEDS's ints
  # written in decimal, a manifest's own), the labels table holds MEDS's int64 ids.
  keys = [str(int(s)) for s in labels.subject_ids]
  if timed.any():
    seen: dict[tuple[str, np.datetime64], int] = {}
    for row, key in enumerate(zip(keys, times)):
      if key in seen:
        raise ValueError(f"labels {labels.path}: rows {seen[key]} and {row} have the same subject_id {key[0]} and "
                         f"prediction_time {key[1]}")
      seen[key] = row
  else:
    ids, counts = np.unique(labels.subject_ids, return_counts=True)
    if (counts > 1).any():
      raise ValueError(f"labels {labels.path}: subject_id {int(ids[counts > 1][0])} has {int(counts.max())} rows; "
                       f"subject-level labels take one row per subject (or give each row a prediction_time)")
  rows_of: dict[str, list[int]] = {}
  for row, key in enumerate(keys):
    rows_of.setdefault(key, []).append(row)
  out, matched, nothing_before = {}, 0, 0
  for split in splits:
    source = joined.source(split)
    first: dict[str, int] = {}  # a subject's first item (a balanced training order repeats subjects)
    for item, subject in enumerate(source.subject_ids):
      first.setdefault(str(subject), item)
    pairs = sorted((item, row) for s, item in first.items() for row in rows_of.get(s, ()))
    sources, dated = timed_and_dated(joined, split) if timed.any() else ({}, {})
    keep, absent, dated_records = [], [], []
    for item, row in pairs:
      present = source[item]["records"]
      gone = [m for m in sorted(sources) if m in present
              and not _has_history(sources[m], present[m][0], times[row], cut)]
      readable = {m: _made_by(dated[m], present[m], times[row], cut) for m in sorted(dated) if present.get(m)}
      gone += [m for m, records in readable.items() if not records]
      if len(gone) == len(present):
        nothing_before += 1
        continue
      keep.append((item, row))
      absent.append(tuple(sorted(gone)))
      dated_records.append({m: records for m, records in readable.items() if records})
    matched += len(pairs)
    items = np.asarray([k[0] for k in keep], np.int64)
    rows = np.asarray([k[1] for k in keep], np.int64)
    out[split] = SubjectRows(rows, items, times[rows], tuple(absent), tuple(dated_records))
  return out, {"subjects_in_no_split": len(labels) - matched, "rows_with_nothing_before_prediction_time": nothing_before}


def _has_history(source: Any, record: int, time: np.datetime64, cut: str) -> bool:
  first = source.first_event_times()[record]
  return not np.isnat(first) and (first <= time if cut == "inclusive" else first < time)


class TimedItems:
  """Join items `rows.items` of `source` in that order, each with what its label row may
  use: the prediction time and cut (`JoinModalities` cuts timed modalities there), only the
  dated modalities' records made by then, and without the modalities absent at that time.
  Untimed rows are the items as they are."""

  def __init__(self, source: Any, rows: SubjectRows, cut: str = "inclusive"):
    self._source, self._rows, self._inclusive = source, rows, cut == "inclusive"

  def __len__(self) -> int:
    return len(self._rows.items)

  def __getitem__(self, index: int) -> dict:
    i = int(index)
    item = self._source[int(self._rows.items[i])]
    time = self._rows.times[i]
    if np.isnat(time):
      return item
    absent, dated = self._rows.absent[i], self._rows.dated_records[i] if self._rows.dated_records else {}
    return {**item, "records": {m: list(dated.get(m, r)) for m, r in item["records"].items() if m not in absent},
            PREDICTION_TIME: time, INCLUSIVE: self._inclusive}
