"""Downstream labels for the synthetic MEDS cohort (`synthetic.py`), in the MEDS label format.

Each subject gets one prediction time part-way through its timeline (just after a random
event between 30% and 70% of its timed events), so the model sees a real history and the
outcome lies in the future. Tasks:

  mortality          binary: the subject dies (a MEDS_DEATH row) after the prediction time
                     (rare: about 8% of subjects)
  high_risk          binary: the planted latent risk is above 0.5 (about 30%), a phenotype
                     that only shows through the codes the risk makes likely
  risk               regression: the planted latent risk
  planted_survival   survival with a planted hazard: time to event ~ Exponential with rate
                     exp(risk) / 365 per day, censored by a uniform follow-up of up to two
                     years; `censor_fraction` censors that share of subjects early on top,
                     for tests with heavy censoring

The latent risk drives the cardiometabolic codes, labs and deaths in the history (see
`synthetic.py`), so a good embedding predicts these labels. Every labels file also carries `sex`
(from the static gender row) as a covariate for subgroup reports.

CLI:
  python -m biofm_jax.modalities.ehr.synthetic_labels --meds /tmp/meds --task mortality --out labels.parquet
"""
from __future__ import annotations

import argparse
import pathlib

import meds
import numpy as np
import pyarrow.parquet as pq

from biofm_jax.data.labels import write_labels
from biofm_jax.modalities.ehr.meds import US_PER_DAY, MEDSDataset
from biofm_jax.modalities.ehr.synthetic import LATENTS_FILEPATH
from biofm_jax.modalities.ehr.synthetic_catalogue import STATIC_CODES

TASKS = ("mortality", "high_risk", "risk", "planted_survival")


def _prediction_time(times: np.ndarray, rng: np.random.Generator) -> np.datetime64 | None:
  timed = np.sort(times[~np.isnat(times)])
  if len(timed) < 3:
    return None
  k = int(rng.integers(int(0.3 * len(timed)), max(int(0.7 * len(timed)), int(0.3 * len(timed)) + 1)))
  k = min(max(k, 1), len(timed) - 2)
  # One minute after event k: it and every event at the same instant are history.
  return timed[k] + np.timedelta64(60_000_000, "us")


def synthetic_labels(meds_root: str | pathlib.Path, task: str, *, seed: int = 0,
                     censor_fraction: float = 0.0) -> dict[str, np.ndarray]:
  """Columns of the labels table of `task` for every subject with enough history."""
  if task not in TASKS:
    raise ValueError(f"synthetic labels: task {task!r} is not one of {TASKS}")
  root = pathlib.Path(meds_root)
  dataset = MEDSDataset(root)
  latents = pq.read_table(root / LATENTS_FILEPATH).to_pandas().set_index("subject_id")
  rng = np.random.default_rng([seed, 7])
  rows: dict[str, list] = {"subject_id": [], "prediction_time": [], "sex": [], "died": [], "time": [], "risk": []}
  for split in dataset.splits:
    source = dataset.source(split)
    for i in range(len(source)):
      record = source[i]
      codes, times = np.asarray(record["codes"], dtype=object), record["times"]
      cutoff = _prediction_time(times, rng)
      if cutoff is None:
        continue
      death = times[(codes == meds.death_code) & ~np.isnat(times)]
      end = death[0] if len(death) else times[~np.isnat(times)].max()
      rows["subject_id"].append(int(record["subject_id"]))
      rows["prediction_time"].append(cutoff)
      rows["sex"].append("F" if STATIC_CODES[0] in set(codes) else "M")
      rows["died"].append(bool(len(death)))
      rows["time"].append(max((end - cutoff).astype(np.int64) / US_PER_DAY, 1.0))
      rows["risk"].append(float(latents.loc[int(record["subject_id"]), "risk"]))
  out = {k: np.asarray(v) for k, v in rows.items()}
  if task == "planted_survival":
    n = len(out["risk"])
    event_time = rng.exponential(365.0 * np.exp(-out["risk"]))
    follow_up = rng.uniform(30.0, 730.0, n)
    # Heavy-censoring variant: a share of subjects leave early (a uniform fraction of their follow-up).
    early = rng.random(n) < censor_fraction
    follow_up = np.where(early, follow_up * rng.uniform(0.02, 0.3, n), follow_up)
    out["died"] = event_time <= follow_up
    out["time"] = np.maximum(np.minimum(event_time, follow_up), 1.0)
  return out


def write_synthetic_labels(meds_root: str | pathlib.Path, out_path: str | pathlib.Path, task: str, *,
                           seed: int = 0, censor_fraction: float = 0.0) -> pathlib.Path:
  """Writes the labels of `task` as a MEDS labels parquet file at `out_path`."""
  cols = synthetic_labels(meds_root, task, seed=seed, censor_fraction=censor_fraction)
  common = dict(sex=cols["sex"])
  if task == "mortality":
    return write_labels(out_path, cols["subject_id"], cols["prediction_time"], boolean_value=cols["died"], **common)
  if task == "high_risk":
    return write_labels(out_path, cols["subject_id"], cols["prediction_time"], boolean_value=cols["risk"] > 0.5,
                        **common)
  if task == "planted_survival":
    return write_labels(out_path, cols["subject_id"], cols["prediction_time"], boolean_value=cols["died"],
                        float_value=cols["time"].astype(np.float32), **common)
  return write_labels(out_path, cols["subject_id"], cols["prediction_time"],
                      float_value=cols["risk"].astype(np.float32), **common)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--meds", required=True, help="a synthetic MEDS cohort (synthetic.py)")
  parser.add_argument("--task", required=True, choices=TASKS)
  parser.add_argument("--out", required=True, help="the labels parquet file to write")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--censor_fraction", type=float, default=0.0)
  args = parser.parse_args(argv)
  path = write_synthetic_labels(args.meds, args.out, args.task, seed=args.seed, censor_fraction=args.censor_fraction)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
