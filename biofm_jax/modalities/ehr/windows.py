"""Training windows that cover every event of every training timeline, each epoch.

One window per subject (the most recent `max_len - 1` events) never trains on the rest of
a long timeline: on heavy-tailed cohorts most events. Here a timeline of n timed events,
with s static rows (kept up to `static_room`, half the window; the rest are counted and
left out) and room r = max_len - 1 - min(s, static_room) for timed events, becomes
consecutive windows of r events that start every r - overlap events, the last one ending
at the timeline's end: every event is in at least one window, and consecutive windows
share `overlap` events of context. A timeline that fits is one window.

Consecutive windows rather than random ones: coverage is exact each epoch (not only in
expectation), the number of windows is known before training, and they are a pure
function of the data, so global batch k depends only on the seed (the pipeline shuffles
the windows every epoch). Evaluation keeps one deterministic window per subject.

A window is read as its subject's record cut to the static rows plus its events; the
record's birth time travels with it (`birth_time`), so ages stay known in later windows,
and so do the events after it (`future_codes`, `future_times`), which only targets read.
"""
from __future__ import annotations

import meds
import numpy as np

from biofm_jax.data.sources.indexing import checked_index

TRAIN_WINDOWS = ("one", "cover")


def birth_time(codes: np.ndarray, times: np.ndarray) -> np.datetime64 | None:
  """The time of the record's first timed MEDS_BIRTH row, or None."""
  timed_births = np.flatnonzero((codes == meds.birth_code) & ~np.isnat(times))
  return times[timed_births[0]] if len(timed_births) else None


def static_room(max_len: int) -> int:
  """Static rows a window keeps at most: half its event slots (CLS takes one), so that a
  subject with many static rows still has room for timed events (without the cap, 36
  static rows at max_len 32 gave windows of static rows only, one per timed event)."""
  return (max_len - 1) // 2


def kept_static(static_counts: np.ndarray, max_len: int) -> np.ndarray:
  """Per subject: the static rows each of its windows holds (the first ones, in record order)."""
  return np.minimum(np.asarray(static_counts, np.int64), static_room(max_len))


def cover_windows(static_counts: np.ndarray, event_counts: np.ndarray, max_len: int,
                  overlap: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(subject index, first timed event, timed events) per window, subjects in order.

  `static_counts` and `event_counts` are per subject (rows with a null time, all rows);
  `overlap` is the share of a window's room that the next window repeats, in [0, 1).
  """
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"window_overlap {overlap!r}: expected a fraction in [0, 1)")
  static = np.asarray(static_counts, np.int64)
  timed = np.asarray(event_counts, np.int64) - static
  room = max_len - 1 - kept_static(static, max_len)  # at least half the window
  stride = np.maximum(room - np.floor(overlap * room).astype(np.int64), 1)
  # Windows per subject: 1 if it fits, else ceil((n - r) / stride) + 1 (the last one flush with the end).
  extra = np.where(timed > room, -(-(timed - room) // stride), 0)
  count = extra + 1
  subject = np.repeat(np.arange(len(timed)), count)
  k = np.arange(len(subject)) - np.repeat(np.cumsum(count) - count, count)  # window number within its subject
  last_start = np.maximum(timed - room, 0)
  start = np.minimum(k * stride[subject], last_start[subject])
  length = np.minimum(room[subject], timed[subject])
  return subject, start, length


def event_coverage(event_counts: np.ndarray, static_counts: np.ndarray, starts: np.ndarray,
                   lengths: np.ndarray, subjects: np.ndarray) -> float:
  """Share of the timed events that at least one window holds."""
  timed = np.asarray(event_counts, np.int64) - np.asarray(static_counts, np.int64)
  total = int(timed.sum())
  if not total:
    return 1.0
  order = np.lexsort((starts, subjects))  # each subject's windows in start order
  subject = np.asarray(subjects, np.int64)[order]
  first = np.asarray(starts, np.int64)[order]
  end = first + np.asarray(lengths, np.int64)[order]
  # Per subject, the events [0, reach) covered by its earlier windows: a running maximum of
  # their ends, made per subject by lifting each subject's ends above all earlier subjects'.
  lift = subject * (int(end.max(initial=0)) + 1)
  running = np.maximum.accumulate(end + lift) - lift
  reach = np.r_[0, running[:-1]]
  reach[np.r_[True, subject[1:] != subject[:-1]]] = 0
  return float(np.maximum(end - np.maximum(first, reach), 0).sum()) / total


class WindowSource:
  """The training windows of a per-subject source (`meds.MEDSSource`): item w is subject
  `subjects[w]`'s record cut to its static rows and timed events [start, start + length)."""

  def __init__(self, records, static_counts: np.ndarray, subjects: np.ndarray, starts: np.ndarray,
               lengths: np.ndarray, max_len: int):
    self.records, self.static_counts = records, np.asarray(static_counts, np.int64)
    self.max_len = max_len
    self.subjects, self.starts, self.lengths = subjects, starts, lengths
    self.subject_ids = np.asarray(records.subject_ids)[subjects]

  def __len__(self) -> int:
    return len(self.subjects)

  def __getitem__(self, index: int) -> dict:
    w = checked_index(index, len(self), "WindowSource ... windows")
    record = self.records[int(self.subjects[w])]
    static = int(self.static_counts[self.subjects[w]])
    first = static + int(self.starts[w])
    kept = min(static, static_room(self.max_len))
    rows = np.concatenate([np.arange(kept), np.arange(first, first + int(self.lengths[w]))])
    codes, times = record["codes"], record["times"]
    birth = birth_time(codes, times)
    after = slice(first + int(self.lengths[w]), None)
    return {**record, "codes": codes[rows], "times": times[rows], "numeric_values": record["numeric_values"][rows],
            "birth_time": np.datetime64("NaT", "us") if birth is None else birth,
            # What follows the window: the future that time-to-event targets look into.
            "future_codes": codes[after], "future_times": times[after]}

  def __repr__(self) -> str:
    return f"WindowSource(windows={len(self)}, subjects={len(np.unique(self.subjects))})"
