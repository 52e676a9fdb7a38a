"""Time-to-event targets of EHR timelines (MOTOR style), built on the host.

The tasks are the K most frequent codes of the vocabulary (training counts; `task_codes`).
Prediction points are tokens that end a timestamp (the last event at their time in the
window, so a causal model at the point has seen everything that happened then) and have
some record left after them, evenly spaced. A row of max_len tokens holds at most `points`
of them (`dense_targets` reads no more). An example alone in its row gets
max(1, points * tokens // max_len). The windows of a packed row (`PackTimeToEvent`) share
the row's `points` by their tokens: a window's share is points * tokens / max_len, whose
whole part it always gets and whose fraction it gets by systematic sampling (one random
offset per row). Each window's expected number of points is then exactly its share, short
windows included, and a row never holds more than `points`. Rounding every short window up
to one point instead would overfill rows of many short windows, and the extra points
would be dropped silently.

For a point at time t, the future is every timed event of the whole record after t: the
window's later events and those after the window (`future_codes`, `future_times`, which
`windows.WindowSource` adds), so a point near a window's end still learns what happens a
year later. Each task's first occurrence after t is an event; a task that never occurs is
censored at the record's last event. An example has room for `events * tokens / max_len`
first occurrences; a point whose future holds more distinct tasks than its share ends its
follow-up at the first occurrence that does not fit, and every task from then on is
censored there: administrative censoring, which leaves the likelihood unbiased.

Which codes a checkpoint's tasks are is saved beside the vocabulary (`TASKS_FILENAME`), so
fine-tuning and resumes read the same ones.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import grain
import numpy as np

from biofm_jax.data import batch, packing
from biofm_jax.modalities.ehr.meds import US_PER_DAY

TASKS_FILENAME = "tte_tasks.json"
# config.data.ehr.tte_<name> when the config leaves it out: tasks K, prediction points and
# first-occurrence entries per row of max_len tokens.
DEFAULTS = {"tasks": 256, "points": 16, "events": 1024}


def settings_from_config(cfg: Mapping[str, Any]) -> dict[str, int]:
  """{"tasks", "points", "events"} from config.data.ehr's tte_* fields (DEFAULTS where absent)."""
  return {name: int(cfg.get(f"tte_{name}", default)) for name, default in DEFAULTS.items()}


def task_codes(vocab, num_tasks: int) -> list[str]:
  """The `num_tasks` most frequent codes of `vocab` (its codes are in decreasing training
  count); fewer when the vocabulary is smaller."""
  if num_tasks < 1:
    raise ValueError(f"config.data.ehr.tte_tasks={num_tasks}: expected at least 1 task")
  return list(vocab.codes[:num_tasks])


def save_or_check_tasks(path: str | os.PathLike, codes: list[str]) -> None:
  """Writes the task list once; a later run with other tasks (another vocabulary or K) is
  refused, since the hazard head's rows would mean other codes."""
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)["codes"]
    if saved != codes:
      differ = next(i for i in range(max(len(saved), len(codes))) if saved[i:i + 1] != codes[i:i + 1])
      raise ValueError(f"{path}: this run's time-to-event tasks ({len(saved)} codes) differ from the config's "
                       f"({len(codes)} codes) from task {differ} on; use a new workdir or the same "
                       f"data.ehr.tte_tasks and vocabulary")
    return
  with open(path, "w") as f:
    json.dump({"format": "biofm_jax.tte_tasks", "version": 1, "codes": codes}, f)


def _as_us(times: np.ndarray) -> np.ndarray:
  return np.asarray(times).astype("datetime64[us]").astype(np.int64)


class TimeToEventTargets(grain.transforms.Map):
  """Record -> the tokeniser's example plus `batch.tte_example_spec` targets."""

  def __init__(self, tokenize, task_of_id: np.ndarray, *, points: int, events: int):
    if points < 1 or events < 1:
      raise ValueError(f"config.data.ehr: tte_points={points} and tte_events={events} must be at least 1")
    self.tokenize, self.points, self.events = tokenize, points, events
    self.task_of_id = np.asarray(task_of_id, np.int32)  # token id -> task, -1 for codes that are none
    self.max_len = tokenize.max_len

  @classmethod
  def for_vocab(cls, tokenize, vocab, codes: list[str], *, points: int, events: int) -> TimeToEventTargets:
    task_of_id = np.full(vocab.size, -1, np.int32)
    task_of_id[vocab.code_ids(np.asarray(codes, dtype=object))] = np.arange(len(codes), dtype=np.int32)
    return cls(tokenize, task_of_id, points=points, events=events)

  def tokens(self, record: Mapping[str, Any]) -> int:
    """Tokens the tokeniser makes of `record`: CLS plus at most max_len - 1 rows."""
    return 1 + min(len(record["codes"]), self.max_len - 1)

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """An example alone in its row: at least one point (when it has a candidate)."""
    return self.with_points(record, max(1, self.tokens(record) * self.points // self.max_len))

  def with_points(self, record: Mapping[str, Any], budget: int) -> dict[str, np.ndarray]:
    """The example with at most `budget` prediction points."""
    out, times = self.tokenize.encode(record)
    out.update({name: np.zeros(shape, dtype) for name, (shape, dtype) in
                batch.tte_example_spec(self.max_len, self.events).items()})
    future_times, future_tasks = self._future(record)
    if not len(future_times) or budget < 1:
      return out
    tokens = 1 + len(times)
    chosen = self._points(times, end=future_times[-1], budget=budget)
    if not len(chosen):
      return out
    share = (tokens * self.events // self.max_len) // len(chosen)
    filled = 0
    for j in chosen:
      t = _as_us(times[j])
      follow, tasks, days = _first_occurrences(t, future_times, future_tasks, share)
      out[batch.TTE_PREDICT][j + 1] = True
      out[batch.TTE_FOLLOWUP_DAYS][j + 1] = follow
      at = slice(filled, filled + len(tasks))
      out[batch.TTE_EVENT_POS][at], out[batch.TTE_EVENT_TASK][at] = j + 1, tasks
      out[batch.TTE_EVENT_DAYS][at], out[batch.TTE_EVENT_MASK][at] = days, True
      filled += len(tasks)
    return out

  def _future(self, record) -> tuple[np.ndarray, np.ndarray]:
    """(times in µs, tasks) of the record's timed events and those after its window, by time."""
    codes = np.concatenate([np.asarray(record["codes"], dtype=object),
                            np.asarray(record.get("future_codes", ()), dtype=object)])
    times = np.concatenate([np.asarray(record["times"]).astype("datetime64[us]"),
                            np.asarray(record.get("future_times", ()), "datetime64[us]")])
    timed = ~np.isnat(times)
    codes, times = codes[timed], _as_us(times[timed])
    order = np.argsort(times, kind="stable")
    return times[order], self.task_of_id[self.tokenize.vocab.code_ids(codes[order])]

  def _points(self, times: np.ndarray, *, end: int, budget: int) -> np.ndarray:
    """Window event indices that end their timestamp and have record after them, evenly
    spaced, at most `budget`."""
    if not len(times):
      return np.zeros(0, np.int64)
    known = ~np.isnat(times)
    us = np.where(known, _as_us(np.where(known, times, np.datetime64(0, "us"))), np.iinfo(np.int64).min)
    last_of_time = known & np.r_[us[1:] != us[:-1], True]
    candidates = np.flatnonzero(last_of_time & (us < end))
    if len(candidates) <= budget:
      return candidates
    return candidates[np.unique(np.round(np.linspace(0, len(candidates) - 1, budget)).astype(np.int64))]


def share_points(tokens: np.ndarray, points: int, max_len: int, offset: int) -> np.ndarray:
  """Points per window of a packed row: window i's share is tokens[i] * points / max_len;
  its whole part for sure, its fraction by systematic sampling with `offset` in
  [0, max_len) (uniform: each window then gets its share in expectation). The total is at
  most (sum(tokens) * points + offset) // max_len <= points, as sum(tokens) <= max_len."""
  numerators = np.asarray(tokens, np.int64) * points
  if numerators.sum() > points * max_len:
    raise ValueError(f"share_points: {int(np.sum(tokens))} tokens do not fit a row of {max_len}")
  whole, fraction = numerators // max_len, numerators % max_len
  reached = (np.cumsum(fraction) + offset) // max_len
  return whole + np.diff(np.r_[offset // max_len, reached])


class PackTimeToEvent(grain.transforms.RandomMap):
  """A packed row of records (`packing.PackedSource`) -> one row with time-to-event
  targets: the row's `points` shared among its windows (`share_points`), then
  `packing.pack_examples`. Random (seeded by the row's position, as every Grain random map)
  so that over epochs every window gets its share, not always the first or longest."""

  def __init__(self, targets: TimeToEventTargets):
    self.targets, self.max_len = targets, targets.max_len

  def random_map(self, row: Mapping[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
    records = row[packing.SEGMENTS]
    tokens = np.array([self.targets.tokens(r) for r in records], np.int64)
    budgets = share_points(tokens, self.targets.points, self.max_len, int(rng.integers(self.max_len)))
    return packing.pack_examples([self.targets.with_points(r, int(b)) for r, b in zip(records, budgets)],
                                 self.max_len)


def _first_occurrences(t: int, times: np.ndarray, tasks: np.ndarray, room: int):
  """(follow-up days, tasks, days to each's first occurrence) after time t (µs), at most
  `room` tasks: the follow-up ends at the record's end, or at the first occurrence that
  does not fit."""
  after = int(np.searchsorted(times, t, side="right"))
  future_times, future_tasks = times[after:], tasks[after:]
  end = int(times[-1])
  real = future_tasks >= 0
  unique, first = np.unique(future_tasks[real], return_index=True)
  first_times = future_times[real][first]
  order = np.argsort(first_times, kind="stable")
  unique, first_times = unique[order], first_times[order]
  if len(unique) > room:
    end = int(first_times[room])
    keep = first_times < end
    unique, first_times = unique[keep], first_times[keep]
  return ((end - t) / US_PER_DAY, unique.astype(np.int32),
          ((first_times - t) / US_PER_DAY).astype(np.float32))
