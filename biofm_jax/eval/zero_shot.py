"""Zero-shot prediction by simulating futures (ETHOS style), from label rows.

For each label row (a subject and a prediction time), the prompt is exactly what the
labels' rule allows: the subject's record cut at the prediction time (`meds.LabelSchema`:
events at or before it; `inclusive=False`: strictly before), tokenised as fine-tuning sees
it (CLS, then the most recent events that fit). `simulate` samples `samples` futures per
row with `generate.py`; `occurrence_fraction` reads, per row, the share of its futures
holding one of the outcome codes within the horizon: the zero-shot probability.

Outcome codes are given as exact codes or prefixes ending in `*` (`ICD10CM//N18*`), matched
against the model's vocabulary; a code that matches nothing is an error naming the
closest vocabulary entries.
"""
from __future__ import annotations

import difflib
import time
from typing import Any, Sequence

import jax
import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.generate import GenerationSettings, contains, generate
from biofm_jax.modalities.ehr.data import TokenizeEHR
from biofm_jax.modalities.ehr.task_data import history_rows
from biofm_jax.train.runs import open_run


def resolve_codes(vocab, patterns: Sequence[str]) -> tuple[list[str], np.ndarray]:
  """(the vocabulary codes, their token ids) that `patterns` name: exact codes or prefixes
  ending in '*'."""
  codes = list(vocab.codes)
  found: list[str] = []
  for pattern in patterns:
    matches = ([c for c in codes if c.startswith(pattern[:-1])] if pattern.endswith("*")
               else [c for c in codes if c == pattern])
    if not matches:
      close = difflib.get_close_matches(pattern.rstrip("*"), codes, n=3, cutoff=0.5)
      raise ValueError(f"zero-shot code {pattern!r} is not in the model's vocabulary of {len(codes)} codes"
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


def simulate(model, params, tokenize, records: Sequence[dict], *, samples: int, settings: GenerationSettings,
             gap_edges, seed: int = 0, batch_size: int = 64) -> dict[str, np.ndarray]:
  """`samples` simulated futures of each record: {"row": int [R * samples], "sample", and
  `generate`'s "codes", "days", "generated" per future}, plus "seconds" the simulation took.
  Batches have a fixed size (the last is padded), so one compiled program serves all."""
  if samples < 1:
    raise ValueError(f"zero-shot: samples={samples} must be at least 1")
  prompts = [tokenize.map(r) for r in records]
  rows = np.repeat(np.arange(len(prompts)), samples)
  parts: dict[str, list] = {"codes": [], "days": [], "generated": []}
  start = time.perf_counter()
  key = jax.random.key(seed)
  for at in range(0, len(rows), batch_size):
    chunk = rows[at: at + batch_size]
    padded = np.concatenate([chunk, np.full(batch_size - len(chunk), chunk[0])])
    batch = {name: np.stack([prompts[i][name] for i in padded]) for name in B.EHR_INPUT_FIELDS}
    out = generate(model, params, batch, jax.random.fold_in(key, at // batch_size), settings, gap_edges=gap_edges)
    for name in parts:
      parts[name].append(out[name][: len(chunk)])
  result = {name: np.concatenate(v) for name, v in parts.items()} if len(rows) else {
      "codes": np.zeros((0, settings.max_new), np.int32), "days": np.zeros((0, settings.max_new), np.float32),
      "generated": np.zeros((0, settings.max_new), bool)}
  result.update(row=rows, sample=np.tile(np.arange(samples), len(prompts)),
                seconds=np.float64(time.perf_counter() - start))
  return result


def occurrence_fraction(simulated: dict[str, np.ndarray], code_ids, horizon_days: float, num_rows: int) -> np.ndarray:
  """[num_rows] share of each row's simulated futures that hold one of `code_ids` within
  `horizon_days` (the zero-shot probability of the outcome)."""
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
  tokenize = TokenizeEHR(data.ehr.vocab, data.ehr.max_len)
  scores, seconds, timelines = {}, 0.0, 0
  for split in splits:
    records = data.records(split)
    simulated = simulate(setup.model, params, tokenize, records, samples=samples, settings=settings,
                         gap_edges=config.objective.get("gap_edges_days", ()), seed=seed)
    scores[split] = occurrence_fraction(simulated, ids, horizon_days, len(records))
    seconds += float(simulated["seconds"])
    timelines += len(simulated["row"])
  return scores, {"method": "share of simulated futures holding an outcome code within the horizon (zero-shot)",
                  "codes": list(codes), "vocabulary_codes": names, "horizon_days": horizon_days,
                  "samples_per_row": samples, "max_new_events": settings.max_new, "timelines": timelines,
                  "seconds": round(seconds, 3), "seconds_per_timeline": round(seconds / max(timelines, 1), 6)}
