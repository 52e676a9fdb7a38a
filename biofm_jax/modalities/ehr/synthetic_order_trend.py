"""A generated MEDS cohort whose outcome counting codes cannot see: it depends on how a lab
value moves, on which of two related codes comes first, and on the time between visits.

Every subject has the same kinds and the same numbers of the informative codes:
- exactly `VISITS` visits, each with one eGFR lab (`LAB_CODE`, a numeric value) and 2 to 5
  filler codes drawn from one pool for everyone (`FILLER_CODES`), plus a second lab with a
  value that carries nothing (`NOISE_LAB_CODE`);
- the two related codes `FIRST_CODE` (chest pain) and `SECOND_CODE` (a nitrate) once each,
  in two different visits among the last `PAIR_VISITS`;
- a static sex row and a birth row.

The outcome at the prediction time (one minute after the last visit) is drawn with
probability sigmoid(-1.8 * trend + 2.2 * [chest pain before nitrate] + 2.2 * [the last two
visits less than `SOON_DAYS` apart] - 2.4), where `trend` ~ N(0, 1) sets the slope of eGFR
over the last `TREND_VISITS` visits (5 units per visit and unit of trend; falling eGFR raises
the risk) on top of a subject level ~ N(70, 15) and visit noise (sd 3). The three drivers
are independent, so each is measurable alone; counts of codes carry none of them (AUROC
about 0.5), and the generating probability (the oracle) gives about 0.89.

Written:
  data/0.parquet ...                 meds.DataSchema
  metadata/subject_splits.parquet    80/10/10 train/tuning/held_out
  metadata/codes.parquet             every code with a description
  metadata/order_trend_latents.parquet  subject_id, trend, first_code_first, soon, oracle, outcome
and, by `write_order_trend_labels`, a labels file in `meds.LabelSchema` (`boolean_value`).

CLI:
  python -m biofm_jax.modalities.ehr.synthetic_order_trend --out /tmp/order_trend --subjects 2000
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib

import meds
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biofm_jax.data.sources.atomic import atomic_directory
from biofm_jax.data.labels import write_labels
from biofm_jax.modalities.ehr.synthetic import split_names

LATENTS_FILEPATH = os.path.join("metadata", "order_trend_latents.parquet")
VISITS = 10
TREND_VISITS = 4  # the lab moves over the last visits only
PAIR_VISITS = 6  # the two related codes fall in two of the last visits
SOON_DAYS = 21.0  # "the last two visits close together"
LAB_CODE = "LOINC//33914-3"  # eGFR
NOISE_LAB_CODE = "LOINC//2345-7"  # glucose: a value that carries nothing
FIRST_CODE = "ICD10CM//R07.9"  # chest pain, unspecified
SECOND_CODE = "ATC//C01DA02"  # glyceryl trinitrate
FILLER_CODES = tuple(f"ICD10CM//Z{n:02d}.0" for n in range(40))
STATIC_CODES = ("GENDER//F", "GENDER//M")
# The outcome's log-odds: weights of -trend, chest pain first, and a soon return; the offset.
WEIGHTS = {"trend": -1.8, "first_code_first": 2.2, "soon": 2.2, "offset": -2.4}
DESCRIPTIONS = {LAB_CODE: "Glomerular filtration rate (eGFR)", NOISE_LAB_CODE: "Glucose",
                FIRST_CODE: "Chest pain, unspecified", SECOND_CODE: "Glyceryl trinitrate",
                "GENDER//F": "Female", "GENDER//M": "Male", meds.birth_code: "Birth"}


@dataclasses.dataclass(frozen=True)
class Subject:
  codes: np.ndarray  # object
  times: np.ndarray  # datetime64[us]; NaT for static rows
  values: np.ndarray  # float32; NaN for none
  trend: float
  first_code_first: bool
  soon: bool
  oracle: float  # the outcome's generating probability
  outcome: bool


def outcome_probability(trend, first_code_first, soon) -> np.ndarray:
  """The generating probability of the outcome (the oracle's score)."""
  logit = (WEIGHTS["trend"] * np.asarray(trend, np.float64) + WEIGHTS["first_code_first"] * np.asarray(first_code_first)
           + WEIGHTS["soon"] * np.asarray(soon) + WEIGHTS["offset"])
  return 1.0 / (1.0 + np.exp(-logit))


def _visit_days(rng: np.random.Generator, soon: bool) -> np.ndarray:
  """Days of the visits from the first: gaps of 30-120 days, the last one under
  SOON_DAYS for a soon return (else 30-120 like the others)."""
  gaps = rng.uniform(30.0, 120.0, VISITS - 1)
  if soon:
    gaps[-1] = rng.uniform(3.0, SOON_DAYS - 1.0)
  return np.concatenate([[0.0], np.cumsum(gaps)])


def simulate_subject(rng: np.random.Generator) -> Subject:
  trend = float(rng.normal())
  first_code_first = bool(rng.random() < 0.5)
  soon = bool(rng.random() < 0.4)
  oracle = float(outcome_probability(trend, first_code_first, soon))
  days = _visit_days(rng, soon)
  start = np.datetime64("2015-01-01T08:00", "us") + np.timedelta64(int(rng.integers(0, 3 * 365)), "D")
  birth = start - np.timedelta64(int(rng.uniform(40, 80) * 365.25), "D")
  level = rng.normal(70.0, 15.0)
  steps = np.clip(np.arange(VISITS) - (VISITS - TREND_VISITS), -1, None) + 1  # 0 ... 0, 1, 2, 3, 4
  egfr = level + 5.0 * trend * steps + rng.normal(0.0, 3.0, VISITS)
  pair = np.sort(rng.choice(np.arange(VISITS - PAIR_VISITS, VISITS), 2, replace=False))
  first_visit, second_visit = (pair[0], pair[1]) if first_code_first else (pair[1], pair[0])
  codes, offsets, values = [], [], []
  for v in range(VISITS):
    at = days[v] * 24.0  # hours: the rows of a visit are minutes apart, in this order
    visit = [(LAB_CODE, float(egfr[v])), (NOISE_LAB_CODE, float(rng.normal(100.0, 15.0)))]
    visit += [(c, np.nan) for c in rng.choice(FILLER_CODES, int(rng.integers(2, 6)), replace=False).tolist()]
    visit += [(FIRST_CODE, np.nan)] * int(v == first_visit) + [(SECOND_CODE, np.nan)] * int(v == second_visit)
    order = rng.permutation(len(visit))
    for k, i in enumerate(order):
      codes.append(visit[i][0])
      values.append(visit[i][1])
      offsets.append(at * 60.0 + k)  # minutes
  times = start + (np.asarray(offsets) * 60e6).astype("timedelta64[us]")
  static_codes = [STATIC_CODES[int(rng.integers(2))], meds.birth_code]
  return Subject(
      codes=np.asarray(static_codes + codes, object),
      times=np.concatenate([[np.datetime64("NaT", "us"), birth], times]).astype("datetime64[us]"),
      values=np.asarray([np.nan, np.nan] + values, np.float32),
      trend=trend, first_code_first=first_code_first, soon=soon, oracle=oracle,
      outcome=bool(rng.random() < oracle))


def _data_table(subject_ids: np.ndarray, subjects: list[Subject]) -> pa.Table:
  times = np.concatenate([s.times for s in subjects])
  values = np.concatenate([s.values for s in subjects])
  return pa.Table.from_arrays([
      pa.array(np.repeat(subject_ids, [len(s.codes) for s in subjects]), pa.int64()),
      pa.array(times, pa.timestamp("us"), mask=np.isnat(times)),
      pa.array(np.concatenate([s.codes for s in subjects]).tolist(), pa.string()),
      pa.array(values, pa.float32(), mask=np.isnan(values)),
      pa.nulls(len(times), meds.DataSchema.text_value_dtype),
  ], schema=meds.DataSchema.schema())


def write_order_trend_meds(out_dir: str | os.PathLike, *, num_subjects: int = 2000, seed: int = 0,
                           num_shards: int = 2) -> pathlib.Path:
  """Writes the cohort to `out_dir` (absent or empty) and returns its path; deterministic
  given the arguments, written to a hidden sibling and renamed."""
  if num_subjects < 10 or num_shards < 1:
    raise ValueError(f"write_order_trend_meds: num_subjects={num_subjects}, num_shards={num_shards}; "
                     "expected >= 10 and >= 1")
  out = pathlib.Path(out_dir)
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise ValueError(f"{out}: exists and is not an empty directory; choose a new path")
  rng = np.random.default_rng([seed, 33])
  subject_ids = np.arange(1, num_subjects + 1, dtype=np.int64) * 7 + 100_000
  splits = split_names(num_subjects, rng)
  subjects = [simulate_subject(np.random.default_rng([seed, 33, i])) for i in range(num_subjects)]
  all_codes = sorted({*FILLER_CODES, LAB_CODE, NOISE_LAB_CODE, FIRST_CODE, SECOND_CODE, *STATIC_CODES,
                      meds.birth_code})
  with atomic_directory(out) as staging:
    (staging / meds.data_subdirectory).mkdir(parents=True)
    for shard, members in enumerate(np.array_split(np.arange(num_subjects), num_shards)):
      pq.write_table(_data_table(subject_ids[members], [subjects[i] for i in members]),
                     staging / meds.data_subdirectory / f"{shard}.parquet")
    (staging / "metadata").mkdir()
    pq.write_table(pa.table({
        meds.SubjectSplitSchema.subject_id_name: pa.array(subject_ids, pa.int64()),
        meds.SubjectSplitSchema.split_name: pa.array(splits.tolist(), pa.string()),
    }, schema=meds.SubjectSplitSchema.schema()), staging / meds.subject_splits_filepath)
    pq.write_table(pa.table({
        "code": all_codes, "description": [DESCRIPTIONS.get(c, f"Filler diagnosis {c}") for c in all_codes],
        "parent_codes": pa.nulls(len(all_codes), pa.list_(pa.string())),
    }, schema=meds.CodeMetadataSchema.schema()), staging / meds.code_metadata_filepath)
    pq.write_table(pa.table({
        "subject_id": pa.array(subject_ids, pa.int64()),
        **{field: np.array([getattr(s, field) for s in subjects])
           for field in ("trend", "first_code_first", "soon", "oracle", "outcome")},
    }), staging / LATENTS_FILEPATH)
    dataset = {"dataset_name": "biofm_jax_order_trend", "dataset_version": f"seed{seed}_n{num_subjects}",
               "etl_name": __name__, "etl_version": "1", "meds_version": meds.__version__}
    (staging / meds.dataset_metadata_filepath).write_text(json.dumps(dataset, indent=2))
  return out


def read_latents(meds_root: str | os.PathLike) -> dict[str, np.ndarray]:
  """The planted truth per subject: subject_id, trend, first_code_first, soon, oracle, outcome."""
  table = pq.read_table(pathlib.Path(meds_root) / LATENTS_FILEPATH)
  return {name: table.column(name).to_numpy() for name in table.column_names}


def write_order_trend_labels(meds_root: str | os.PathLike, out: str | os.PathLike) -> pathlib.Path:
  """The outcome as MEDS labels: one row per subject, one minute after its last event."""
  root = pathlib.Path(meds_root)
  latents = read_latents(root)
  data = pq.read_table(root / meds.data_subdirectory, columns=["subject_id", "time"])
  last = (data.group_by("subject_id").aggregate([("time", "max")]).sort_by("subject_id"))
  ids = last.column("subject_id").to_numpy()
  if not np.array_equal(ids, np.sort(latents["subject_id"])):
    raise ValueError(f"{root}: the data's subjects differ from {LATENTS_FILEPATH}'s")
  order = np.argsort(latents["subject_id"])
  times = last.column("time_max").to_numpy().astype("datetime64[us]") + np.timedelta64(60_000_000, "us")
  return write_labels(out, ids, times, boolean_value=latents["outcome"][order].astype(bool))


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--subjects", type=int, default=2000)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  root = write_order_trend_meds(args.out, num_subjects=args.subjects, seed=args.seed)
  labels = write_order_trend_labels(root, root / "labels" / "outcome.parquet")
  print(f"wrote {root} and {labels}")


if __name__ == "__main__":
  main()
