"""Zero-shot prediction by simulating futures (ETHOS style), from label rows.

For each label row (a subject and a prediction time), the prompt is exactly what the
labels' rule allows: the subject's record cut at the prediction time (`meds.LabelSchema`:
events at or before it; `inclusive=False`: strictly before), tokenised as training's
tokeniser presents a window of the prompt's slots (CLS, static rows, the most recent events
that fit, times from the first of them). The time from the record's last event to the
prediction time has passed with no event (`quiet_days`), so `simulate` samples `samples`
futures per row with `generate.py` starting at the prediction time; `occurrence_fraction`
reads, per row, the share of its futures holding one of the outcome codes in (prediction
time, prediction time + horizon]: the zero-shot probability.

Outcome (and stop) codes are given as exact codes or prefixes ending in `*`
(`ICD10CM//N18*`), matched against the model's vocabulary; a code that matches nothing is
an error naming the closest vocabulary entries.
"""
from __future__ import annotations

import difflib
import time
from typing import Any, Sequence

import jax
import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.generate import GenerationSettings, contains, generate, prompt_slots, rows_per_batch
from biofm_jax.modalities.ehr.meds import US_PER_DAY
from biofm_jax.modalities.ehr.data import EHRData
from biofm_jax.modalities.ehr.task_data import history_rows
from biofm_jax.train.runs import open_run


def resolve_codes(vocab, patterns: Sequence[str], what: str = "zero-shot code") -> tuple[list[str], np.ndarray]:
  """(the vocabulary codes, their token ids) that `patterns` name: exact codes or prefixes
  ending in '*'. A pattern naming nothing is an error that starts with `what` (the flag)."""
  codes = list(vocab.codes)
  found: list[str] = []
  for pattern in patterns:
    matches = ([c for c in codes if c.startswith(pattern[:-1])] if pattern.endswith("*")
               else [c for c in codes if c == pattern])
    if not matches:
      close = difflib.get_close_matches(pattern.rstrip("*"), codes, n=3, cutoff=0.5)
      missing = "matches no code in" if pattern.endswith("*") else "is not in"
      raise ValueError(f"{what} {pattern!r} {missing} the model's vocabulary of {len(codes)} codes"
                       + (f"; closest: {close}" if close else ""))
    found += [c for c in matches if c not in found]
  return found, vocab.code_ids(np.asarray(found, dtype=object)).astype(np.int32)


def label_histories(dataset: Any, subject_ids: np.ndarray, prediction_times: np.ndarray, *,
                    inclusive: bool = True) -> tuple[np.ndarray, list[dict]]:
  """(label row indices kept, their records cut at the prediction time). Rows whose subject
  is in no split, or has no event the cut keeps, are left out."""
  rows, records = [], []
  subject_ids = np.asarray(subject_ids, np.int64)
  for split in dataset.splits:
    source = dataset.source(split)
    if not len(source):
      continue
    positions, known, usable, _ = history_rows(source, subject_ids, prediction_times,
                                               "inclusive" if inclusive else "strict")
    for i in np.flatnonzero(usable):
      rows.append(int(i))
      records.append(source.record_until(int(positions[i]), prediction_times[i], inclusive=inclusive))
  order = np.argsort(rows, kind="stable")
  return np.asarray(rows, np.int64)[order], [records[i] for i in order]


def quiet_days(records: Sequence[dict], prediction_times: np.ndarray) -> np.ndarray:
  """float64 [R]: days from each record's last timed event to its prediction time (the time
  the record shows to have passed with no event); 0 for a record with no timed event."""
  times = np.asarray(prediction_times, "datetime64[us]")
  if len(times) != len(records):
    raise ValueError(f"zero-shot: {len(times)} prediction times for {len(records)} records")
  out = np.zeros(len(records))
  for i, record in enumerate(records):
    timed = np.asarray(record["times"], "datetime64[us]")
    timed = timed[~np.isnat(timed)]
    if len(timed):
      out[i] = (times[i] - timed.max()).astype(np.int64) / US_PER_DAY
  bad = np.flatnonzero(out < 0)
  if len(bad):
    raise ValueError(f"zero-shot: record {bad[0]} (subject_id {records[bad[0]].get('subject_id', '?')}) has an event "
                     f"{-out[bad[0]]:.3f} days after its prediction time; histories must be cut at it")
  return out


def simulate(model, params, ehr: EHRData, records: Sequence[dict], prediction_times: np.ndarray, *, samples: int,
             settings: GenerationSettings, gap_edges, seed: int = 0, batch_size: int = 0) -> dict[str, np.ndarray]:
  """`samples` simulated futures of each record, from its prediction time on: {"row": int
  [R * samples], "sample", and `generate`'s "codes", "days" (after the prediction time),
  "generated" per future}, plus "quiet_days" [R] and "seconds" the simulation took.
  Batches have a fixed size (the last is padded), so one compiled program serves all: 64
  futures, or fewer where their cache would pass `generate.CACHE_BUDGET_BYTES` (0), or
  `batch_size`. `ehr`: the run's EHR data module, whose tokeniser makes the prompts."""
  if samples < 1:
    raise ValueError(f"zero-shot: samples={samples} must be at least 1")
  quiet = quiet_days(records, prediction_times)
  slots = prompt_slots(model, settings)
  batch_size = batch_size or rows_per_batch(model.cfg, slots + settings.max_new)
  tokenize = ehr.tokenizer(slots, window="recent")  # the window training shows
  prompts = [tokenize.map(r) for r in records]
  rows = np.repeat(np.arange(len(prompts)), samples)
  parts: dict[str, list] = {"codes": [], "days": [], "generated": []}
  start = time.perf_counter()
  key = jax.random.key(seed)
  # A batch's futures come from at most this many histories (consecutive runs of `samples`):
  # each is prefilled once (a fixed count, padded, so one compiled program serves all).
  histories = min(batch_size, -(-(batch_size - 1) // samples) + 1)
  for at in range(0, len(rows), batch_size):
    chunk = rows[at: at + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
    distinct, sources = np.unique(padded, return_inverse=True)
    distinct = np.concatenate([distinct, np.full(histories - len(distinct), distinct[0])])
    batch = {name: np.stack([prompts[i][name] for i in distinct]) for name in prompts[0]}
    out = generate(model, params, batch, jax.random.fold_in(key, at // batch_size), settings, gap_edges=gap_edges,
                   quiet_days=quiet[padded], sources=sources)
    for name in parts:
      parts[name].append(out[name][: len(chunk)])
  result = {name: np.concatenate(v) for name, v in parts.items()} if len(rows) else {
      "codes": np.zeros((0, settings.max_new), np.int32), "days": np.zeros((0, settings.max_new), np.float32),
      "generated": np.zeros((0, settings.max_new), bool)}
  result.update(row=rows, sample=np.tile(np.arange(samples), len(prompts)), quiet_days=quiet,
                seconds=np.float64(time.perf_counter() - start))
  return result


def occurrence_fraction(simulated: dict[str, np.ndarray], code_ids, horizon_days: float, num_rows: int) -> np.ndarray:
  """[num_rows] share of each row's simulated futures that hold one of `code_ids` within
  `horizon_days` after the prediction time (the zero-shot probability of the outcome)."""
  if not horizon_days > 0:
    raise ValueError(f"zero-shot horizon must be more than 0 days, got {horizon_days}")
  hits = contains(simulated, code_ids, horizon_days).astype(np.float64)
  counts = np.bincount(simulated["row"], minlength=num_rows)
  return np.bincount(simulated["row"], weights=hits, minlength=num_rows) / np.maximum(counts, 1)


def zero_shot_scores(pretrained: str, data, splits: Sequence[str], codes: Sequence[str], *, horizon_days: float,
                     samples: int, max_new: int = 0, seed: int = 0) -> tuple[dict[str, np.ndarray], dict]:
  """({split: [rows] zero-shot probabilities}, the report's description) for the label rows
  of `data` (an `EHRTaskData`: histories already cut at each prediction time) from the
  next-event run in `pretrained`."""
  if not horizon_days > 0:
    raise ValueError(f"--zero_shot_horizon_days must be more than 0, got {horizon_days}")
  config, run_data, setup, params, _ = open_run(pretrained)
  names, ids = resolve_codes(data.ehr.vocab, codes)
  settings = GenerationSettings(max_new=max_new or data.ehr.max_len // 2, horizon_days=horizon_days)
  scores, seconds, timelines = {}, 0.0, 0
  for split in splits:
    records = data.records(split)
    simulated = simulate(setup.model, params, data.ehr, records, data.split_labels(split).prediction_times,
                         samples=samples, settings=settings, gap_edges=config.objective.get("gap_edges_days", ()),
                         seed=seed)
    scores[split] = occurrence_fraction(simulated, ids, horizon_days, len(records))
    seconds += float(simulated["seconds"])
    timelines += len(simulated["row"])
  return scores, {"method": "share of simulated futures holding an outcome code within the horizon after the "
                            "prediction time (zero-shot)",
                  "codes": list(codes), "vocabulary_codes": names, "horizon_days": horizon_days,
                  "samples_per_row": samples, "max_new_events": settings.max_new, "timelines": timelines,
                  "seconds": round(seconds, 3), "seconds_per_timeline": round(seconds / max(timelines, 1), 6),
                  "seconds_per_label_row": round(seconds * samples / max(timelines, 1), 6),
                  "futures_per_batch": rows_per_batch(setup.model.cfg, prompt_slots(setup.model, settings)
                                                      + settings.max_new)}
