"""Time-to-event targets of EHR timelines (MOTOR style), built on the host.

The tasks are the K most frequent codes of the vocabulary (training counts; `task_codes`).
Prediction points are tokens that end a timestamp (the last event at their time in the
window, so a causal model at the point has seen everything that happened then) and have
some record left after them; at most `points * tokens / max_len` of them per example,
evenly spaced, so that a packed row of max_len tokens never holds more than `points`.

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

from biofm_jax.data import batch
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

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out, times = self.tokenize.encode(record)
    out.update({name: np.zeros(shape, dtype) for name, (shape, dtype) in
                batch.tte_example_spec(self.max_len, self.events).items()})
    future_times, future_tasks = self._future(record)
    if not len(future_times):
      return out
    tokens = 1 + len(times)
    chosen = self._points(times, end=future_times[-1], tokens=tokens)
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

  def _points(self, times: np.ndarray, *, end: int, tokens: int) -> np.ndarray:
    """Window event indices that end their timestamp and have record after them, evenly
    spaced, at most points * tokens / max_len (at least one)."""
    if not len(times):
      return np.zeros(0, np.int64)
    known = ~np.isnat(times)
    us = np.where(known, _as_us(np.where(known, times, np.datetime64(0, "us"))), np.iinfo(np.int64).min)
    last_of_time = known & np.r_[us[1:] != us[:-1], True]
    candidates = np.flatnonzero(last_of_time & (us < end))
    budget = max(1, tokens * self.points // self.max_len)
    if len(candidates) <= budget:
      return candidates
    return candidates[np.unique(np.round(np.linspace(0, len(candidates) - 1, budget)).astype(np.int64))]


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
