"""A synthetic MEDS cohort with planted structure, for tests, demos and benchmarks.

This module owns `write_synthetic_meds`, which writes a valid MEDS directory:

  data/0.parquet ...  (or data/<split>/0.parquet ... when nested)  meds.DataSchema exactly
  metadata/subject_splits.parquet   80/10/10 train/tuning/held_out
  metadata/codes.parquet            every code with a description (meds.CodeMetadataSchema)
  metadata/dataset.json             meds.DatasetMetadataSchema
  metadata/synthetic_latents.parquet  subject_id, risk, outcome, died: the planted truth

Each subject has a latent risk r ~ N(0, 1). High r makes a coherent cardiometabolic
cluster likely (diabetes, hypertension, CKD, heart failure; metformin, insulin, furosemide;
high HbA1c, creatinine, BNP; inpatient stays; death); low r favours an asthma / anxiety /
musculoskeletal cluster. So which codes co-occur in a subject is strongly informative
(masked-code prediction can beat the unigram baseline well), lab values follow the codes,
and `outcome` (heart failure or death) is recoverable from a subject embedding.

Realism that the reader and tokenizer must handle: static rows with a null time, about 5%
of subjects without MEDS_BIRTH, several events sharing a visit's timestamp, Zipf-like code
frequencies with rare codes, timelines from 10 to `max_events` rows (some over 256).

CLI:
  python -m biofm_jax.modalities.ehr.synthetic --out /tmp/meds --num_subjects 2000 --seed 0
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
from typing import NamedTuple

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biofm_jax.data.sources.atomic import atomic_directory
from biofm_jax.modalities.ehr.meds import US_PER_DAY
from biofm_jax.modalities.ehr.synthetic_catalogue import (
    BACKGROUND, CKD, CODES, CODE_ID, CONDITIONS, CONDITION_INDEX, CREATININE, DX_CHANCE,
    DX_CODE, DX_CONDITION, ED, EGFR, HEART_FAILURE, INPATIENT, LABS, LAB_EFFECTS, LAB_HIGH,
    LAB_IDS, LAB_LOG_SCALE, LAB_LOW, LAB_MEANS, LAB_SDS, MED_CODE, MED_CONDITION, OUTPATIENT,
    PANELS, PANEL_BOOSTS, PANEL_CHANCE, PANEL_LABS, PROCEDURE_BOOSTS, PROCEDURE_CHANCE,
    PROCEDURE_IDS, STATIC_CODES, VISIT_IDS, VISIT_PROCEDURE_IDS, description)

LATENTS_FILEPATH = os.path.join("metadata", "synthetic_latents.parquet")



def _day(iso: str) -> int:
  """Days since 1970-01-01."""
  return int(np.datetime64(iso, "D").astype(np.int64))


_LAST_DAY = _day("2025-12-31")  # no visit after this


# ---------------------------------------------------------------- one subject
class _Subject(NamedTuple):
  codes: np.ndarray  # int32 ids into CODES
  times: np.ndarray  # int64 microseconds; static rows masked by `static`
  static: np.ndarray  # bool
  values: np.ndarray  # float32, NaN for no value
  risk: float
  outcome: bool
  died: bool


def _sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def _lab_values(rng, risk: float, active: np.ndarray) -> np.ndarray:
  """A value of every lab at every visit [V, L], following the active conditions."""
  means = LAB_MEANS + active @ LAB_EFFECTS + 0.1 * risk * LAB_SDS
  values = means + LAB_SDS * rng.standard_normal(means.shape)
  values = np.where(LAB_LOG_SCALE, np.exp(values), values)
  # eGFR is computed from creatinine in real labs too, so the two agree.
  values[:, EGFR] = 95.0 * values[:, CREATININE] ** -1.1 + 5 * rng.standard_normal(len(means))
  return np.clip(values, LAB_LOW, LAB_HIGH)


def _visit_events(rng, risk, visit_days, present, onset_days):
  """Rows (visit index, code id, value) for visits at `visit_days`, sorted by visit."""
  n = len(visit_days)
  active = present[None, :] & (onset_days[None, :] <= visit_days[:, None])  # [V, C]
  p_inpatient = _sigmoid(-2.8 + 0.6 * risk + 1.4 * active[:, HEART_FAILURE])
  u = rng.random(n)
  kind = np.where(u < p_inpatient, INPATIENT, np.where(u < p_inpatient + .12, ED, OUTPATIENT))
  visit_index, code = [np.arange(n), np.arange(n)], [VISIT_IDS[kind], VISIT_PROCEDURE_IDS[kind]]
  value = [np.full(2 * n, np.nan, np.float32)]

  def add(visits: np.ndarray, code_ids: np.ndarray, values: np.ndarray | None = None) -> None:
    visit_index.append(visits)
    code.append(code_ids)
    value.append(np.full(len(visits), np.nan, np.float32) if values is None else values)

  # Condition diagnoses and medications while the condition is active: the chronic codes
  # that repeat across a subject's visits and make co-occurrence informative.
  scale = np.where(kind == INPATIENT, 1.3, 1.0)[:, None]
  emitted = rng.random((n, len(DX_CODE))) < DX_CHANCE * scale
  v, k = np.nonzero(active[:, DX_CONDITION] & emitted)
  add(v, DX_CODE[k])
  v, k = np.nonzero(active[:, MED_CONDITION] & (rng.random((n, len(MED_CODE))) < .7))
  add(v, MED_CODE[k])
  for catalogue, weights, rate in BACKGROUND:  # anyone's acute problems, Zipf-distributed
    counts = rng.poisson(rate, n)
    picks = rng.choice(len(catalogue), counts.sum(), p=weights)
    add(np.repeat(np.arange(n), counts), catalogue[picks])
  chance = PROCEDURE_CHANCE[kind] + active @ PROCEDURE_BOOSTS
  v, k = np.nonzero(rng.random(chance.shape) < chance)
  add(v, PROCEDURE_IDS[k])
  labs = _lab_values(rng, risk, active)
  ordered = rng.random((n, len(PANELS))) < PANEL_CHANCE[kind] + active @ PANEL_BOOSTS
  for panel, members in enumerate(PANEL_LABS):
    v = np.flatnonzero(ordered[:, panel])
    for lab in members:
      add(v, np.full(len(v), LAB_IDS[lab]),
          np.round(labs[v, lab], LABS[lab].decimals).astype(np.float32))
  visit_index = np.concatenate(visit_index)
  order = np.argsort(visit_index, kind="stable")  # the visit code stays first in its visit
  return (visit_index[order], np.concatenate(code)[order].astype(np.int32),
          np.concatenate(value)[order])


def _simulate_subject(rng: np.random.Generator, max_events: int, *, risk: float | None = None,
                      female: bool | None = None,
                      condition_shift: np.ndarray | None = None) -> _Subject:
  """One subject's timeline. `risk` (None: drawn from N(0, 1)), `female` (None: drawn,
  52%) and `condition_shift` (None: none; else added to each condition's onset logit, in
  CONDITIONS order) let a caller plant its own latent state, e.g. a multimodal cohort."""
  risk = float(rng.standard_normal()) if risk is None else float(risk)
  female = rng.random() < 0.52 if female is None else bool(female)
  birth_day = _day("1930-01-01") + int(rng.integers(0, _day("2006-01-01") - _day("1930-01-01")))
  has_birth = rng.random() < 0.95
  start_day = max(_day("2010-01-01") + int(rng.integers(0, 11 * 365)), birth_day + 365)
  end_day = min(start_day + int(rng.uniform(1, 12) * 365), _LAST_DAY)
  age_decades = ((start_day - birth_day) / 365.25 - 50) / 10

  present = np.zeros(len(CONDITIONS), bool)
  for i, condition in enumerate(CONDITIONS):
    logit = condition.intercept + condition.risk_slope * risk + condition.age_slope * age_decades
    logit += sum(w for name, w in condition.after if present[CONDITION_INDEX[name]])
    if condition_shift is not None:
      logit += float(condition_shift[i])
    present[i] = rng.random() < _sigmoid(logit)
  # Onsets before follow-up starts are pre-existing conditions.
  onset_days = start_day + rng.uniform(-0.7, 1.0, len(CONDITIONS)) * (end_day - start_day)
  died = rng.random() < _sigmoid(-3.6 + 0.8 * risk + 1.3 * present[HEART_FAILURE]
                                 + 0.5 * present[CKD] + 0.4 * age_decades)
  total = int(np.clip(np.exp(rng.normal(np.log(70), 0.9) + 0.25 * risk), 10, max_events))
  budget = total - 1 - has_birth - died
  # Space visits so that `budget` rows roughly fill the follow-up: sicker subjects have
  # more rows per visit. Every visit has at least 2 rows, so this many always suffice.
  rows_per_visit = 5.5 + 1.5 * present.sum()
  mean_gap = (end_day - start_day) * rows_per_visit / budget
  n_visits = budget // 2 + 1
  visit_offsets = np.cumsum(rng.exponential(mean_gap, n_visits))
  minutes = np.where(rng.random(n_visits) < 0.7, rng.integers(8 * 60, 18 * 60, n_visits),
                     rng.integers(0, 24 * 60, n_visits))
  visit_index, codes, values = _visit_events(rng, risk, start_day + visit_offsets, present,
                                             onset_days)
  # Keep the first `budget` rows: follow-up ends there (censoring).
  visit_index, codes, values = visit_index[:budget], codes[:budget], values[:budget]
  # Where the rows outran the calendar, compress time (visits and onsets alike, so which
  # conditions were active at each visit is unchanged).
  span = visit_offsets[visit_index[-1]]
  squeeze = min(1.0, (_LAST_DAY - start_day) / span)
  visit_days = start_day + (visit_offsets * squeeze).astype(np.int64)
  onset_days = start_day + (onset_days - start_day) * squeeze
  visit_times = visit_days * US_PER_DAY + minutes * 60_000_000
  visit_times.sort()  # only reorders visits on the same day
  times = visit_times[visit_index]
  last_day = visit_days[visit_index[-1]]
  outcome = bool(died or (present[HEART_FAILURE] and onset_days[HEART_FAILURE] <= last_day))

  head_codes = [CODE_ID[STATIC_CODES[0 if female else 1]]]
  head_times = [0]
  if has_birth:
    head_codes.append(CODE_ID[meds.birth_code])
    head_times.append(birth_day * US_PER_DAY)
  tail_codes, tail_times = [], []
  if died:
    tail_codes.append(CODE_ID[meds.death_code])
    tail_times.append(int(times[-1]) + int(rng.integers(1, 90)) * US_PER_DAY)
  n_head, n_tail = len(head_codes), len(tail_codes)
  static = np.zeros(n_head + len(codes) + n_tail, bool)
  static[0] = True
  return _Subject(
      codes=np.concatenate([head_codes, codes, tail_codes]).astype(np.int32),
      times=np.concatenate([head_times, times, tail_times]).astype(np.int64),
      static=static,
      values=np.concatenate([np.full(n_head, np.nan), values,
                             np.full(n_tail, np.nan)]).astype(np.float32),
      risk=risk, outcome=outcome, died=bool(died))


# ---------------------------------------------------------------- writing
def _data_table(subject_ids: np.ndarray, subjects: list[_Subject]) -> pa.Table:
  lengths = [len(s.codes) for s in subjects]
  times = np.concatenate([s.times for s in subjects])
  values = np.concatenate([s.values for s in subjects])
  codes = np.concatenate([s.codes for s in subjects])
  n = len(codes)
  return pa.Table.from_arrays([
      pa.array(np.repeat(subject_ids, lengths), pa.int64()),
      pa.array(times, pa.timestamp("us"), mask=np.concatenate([s.static for s in subjects])),
      pa.array(CODES, pa.string()).take(pa.array(codes)),
      pa.array(values, pa.float32(), mask=np.isnan(values)),
      pa.nulls(n, meds.DataSchema.text_value_dtype),
  ], schema=meds.DataSchema.schema())


def split_names(num_subjects: int, rng: np.random.Generator) -> np.ndarray:
  n_train, n_tuning = round(0.8 * num_subjects), round(0.1 * num_subjects)
  names = np.array([meds.held_out_split] * num_subjects, dtype=object)
  order = rng.permutation(num_subjects)
  names[order[:n_train]] = meds.train_split
  names[order[n_train:n_train + n_tuning]] = meds.tuning_split
  return names


def _write_data(root: pathlib.Path, subject_ids, subjects, split_names, num_shards: int,
                nested: bool) -> None:
  """Each subject in exactly one file, contiguous and time-sorted, as MEDS requires."""
  groups = ([(f"{name}/", np.flatnonzero(split_names == name)) for name in
             (meds.train_split, meds.tuning_split, meds.held_out_split)]
            if nested else [("", np.arange(len(subjects)))])
  for prefix, members in groups:
    for shard, chunk in enumerate(np.array_split(members, num_shards)):
      if not len(chunk):
        continue
      path = root / meds.data_subdirectory / f"{prefix}{shard}.parquet"
      path.parent.mkdir(parents=True, exist_ok=True)
      pq.write_table(_data_table(subject_ids[chunk], [subjects[i] for i in chunk]), path)


def _write_metadata(root: pathlib.Path, subject_ids, subjects, split_names, seed: int) -> None:
  (root / "metadata").mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table({
      meds.SubjectSplitSchema.subject_id_name: pa.array(subject_ids, pa.int64()),
      meds.SubjectSplitSchema.split_name: pa.array(split_names.tolist(), pa.string()),
  }, schema=meds.SubjectSplitSchema.schema()), root / meds.subject_splits_filepath)
  pq.write_table(pa.table({
      "code": list(CODES),
      "description": [description(c) for c in CODES],
      "parent_codes": pa.nulls(len(CODES), pa.list_(pa.string())),
  }, schema=meds.CodeMetadataSchema.schema()), root / meds.code_metadata_filepath)
  pq.write_table(pa.table({
      "subject_id": pa.array(subject_ids, pa.int64()),
      "risk": np.array([s.risk for s in subjects], np.float64),
      "outcome": np.array([s.outcome for s in subjects], bool),
      "died": np.array([s.died for s in subjects], bool),
  }), root / LATENTS_FILEPATH)
  # No created_at: two writes with the same arguments give identical directories.
  dataset = {
      "dataset_name": "biofm_jax_synthetic",
      "dataset_version": f"seed{seed}_n{len(subjects)}",
      "etl_name": __name__,
      "etl_version": "1",
      "meds_version": meds.__version__,
  }
  meds.DatasetMetadataSchema.validate(dataset)
  with open(root / meds.dataset_metadata_filepath, "w") as f:
    json.dump(dataset, f, indent=2)


def write_synthetic_meds(out_dir: str | os.PathLike, *, num_subjects: int = 1000,
                         seed: int = 0, num_shards: int = 2, nested: bool = False,
                         max_events: int = 400) -> pathlib.Path:
  """Writes the cohort to `out_dir` (absent or empty) and returns its path.

  Deterministic given the arguments (no timestamps of the write itself are stored).
  Written to a hidden sibling directory and renamed, so an interrupted write never
  leaves a half-written dataset at `out_dir`.
  """
  if num_subjects < 1 or num_shards < 1 or max_events < 10:
    raise ValueError(f"write_synthetic_meds: num_subjects={num_subjects}, num_shards="
                     f"{num_shards}, max_events={max_events}; expected >= 1, >= 1, >= 10")
  out = pathlib.Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"{out}: exists and is not an empty directory; choose a new path")
  rng = np.random.default_rng([seed, 0])
  subject_ids = np.sort(rng.choice(np.arange(10_000, 10_000 + 20 * num_subjects),
                                   num_subjects, replace=False)).astype(np.int64)
  names = split_names(num_subjects, rng)
  subjects = [_simulate_subject(np.random.default_rng([seed, 1, i]), max_events)
              for i in range(num_subjects)]

  with atomic_directory(out) as staging:
    _write_data(staging, subject_ids, subjects, names, num_shards, nested)
    _write_metadata(staging, subject_ids, subjects, names, seed)
  return out


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="new or empty directory to write")
  parser.add_argument("--num_subjects", type=int, default=1000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_shards", type=int, default=2)
  parser.add_argument("--max_events", type=int, default=400)
  parser.add_argument("--nested", action="store_true", help="data/<split>/<shard>.parquet")
  args = parser.parse_args(argv)
  root = write_synthetic_meds(args.out, num_subjects=args.num_subjects, seed=args.seed,
                              num_shards=args.num_shards, nested=args.nested,
                              max_events=args.max_events)
  files = sorted((root / meds.data_subdirectory).rglob("*.parquet"))
  rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
  print(f"wrote {root}: {args.num_subjects} subjects, {rows} rows, {len(files)} data files")


if __name__ == "__main__":
  main()
