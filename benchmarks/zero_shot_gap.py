"""Zero-shot prediction by simulated futures beside the linear probe, with and without a gap
between each history's last event and its prediction time.

  python benchmarks/zero_shot_gap.py                          # 600 subjects, 300 steps (the test's run)
  python benchmarks/zero_shot_gap.py --subjects=2000 --steps=1000

Pre-trains the tiny next-event model (`configs/ehr_gpt.py:tiny`) on a synthetic cohort, writes
its planted high-risk labels (`synthetic_labels.py`: prediction time one minute after an
event) and a gapped copy of them, then evaluates both (`evaluate_task`: the linear probe and
zero-shot cardiometabolic diagnoses within `--horizon_days`). The gapped copy moves each
prediction time `--gap_share` of the way to the subject's next event (or `--gap_days` past
it when there is none): the history a row may use is unchanged, only the quiet time between
its last event and the prediction time grows, as when a label is set at a date between visits.
A third labels file asks for the outcome itself at the gapped times: whether the subject's
record holds one of the outcome codes in (prediction time, prediction time + horizon], a
label that depends on where the window starts and ends. Prints held-out AUROCs and writes
them as JSON beside the runs.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OUTCOME = ("ICD10CM//I50*", "ICD10CM//N18*", "ICD10CM//E11*")


def pretrain(workdir: pathlib.Path, subjects: int, steps: int) -> None:
  from biofm_jax.config import load_config
  from biofm_jax.train.loop import train_and_evaluate
  if (workdir / "checkpoints" / str(steps)).exists():
    return
  config = load_config(f"{REPO}/configs/ehr_gpt.py:tiny", {
      "train.num_steps": steps, "train.eval_every": steps, "train.log_every": 100, "checkpoint.every_steps": steps,
      "data.ehr.synthetic_subjects": subjects, "train.peak_flops_per_device": 1e9})
  train_and_evaluate(config, workdir)


def subject_times_and_codes(meds_root: pathlib.Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
  from biofm_jax.modalities.ehr.meds import MEDSDataset
  dataset = MEDSDataset(meds_root)
  out = {}
  for split in dataset.splits:
    source = dataset.source(split)
    for i in range(len(source)):
      record = source[i]
      timed = ~np.isnat(record["times"])
      out[int(record["subject_id"])] = (record["times"][timed], np.asarray(record["codes"], dtype=object)[timed])
  return out


def outcome_in_window(events, subject_ids, prediction_times, horizon_days: float) -> np.ndarray:
  """bool per row: the record holds an outcome code in (prediction time, + horizon]."""
  prefixes = tuple(p.rstrip("*") for p in OUTCOME)
  horizon = np.timedelta64(int(horizon_days * 86_400e6), "us")
  out = np.zeros(len(subject_ids), bool)
  for row, (subject, at) in enumerate(zip(subject_ids, prediction_times)):
    times, codes = events[int(subject)]
    inside = (times > at) & (times <= at + horizon)
    out[row] = any(str(c).startswith(prefixes) for c in codes[inside])
  return out


def gapped_prediction_times(meds_root: pathlib.Path, subject_ids, prediction_times, share: float,
                            gap_days: float) -> np.ndarray:
  """Each prediction time moved `share` of the way to the subject's next event after it."""
  from biofm_jax.modalities.ehr.meds import MEDSDataset
  dataset = MEDSDataset(meds_root)
  times_of = {}
  for split in dataset.splits:
    source = dataset.source(split)
    for i in range(len(source)):
      record = source[i]
      times_of[int(record["subject_id"])] = np.sort(record["times"][~np.isnat(record["times"])])
  out = np.asarray(prediction_times, "datetime64[us]").copy()
  for row, (subject, at) in enumerate(zip(subject_ids, out)):
    later = times_of[int(subject)][times_of[int(subject)] > at]
    step = (later[0] - at) * share if len(later) else np.timedelta64(int(gap_days * 86_400e6), "us")
    out[row] = at + step.astype("timedelta64[us]")
  return out


def evaluate(pretrained: pathlib.Path, labels: pathlib.Path, workdir: pathlib.Path, horizon_days: float,
             samples: int, max_new: int) -> dict:
  from biofm_jax.config import load_config
  from biofm_jax.eval.downstream import EvaluationOptions, evaluate_task
  from biofm_jax.train.finetune import finetune_config
  config = finetune_config(load_config(f"{REPO}/configs/finetune.py:high_risk,tiny", {
      "train.peak_flops_per_device": 1e9, "task.labels": str(labels)}), pretrained)
  options = EvaluationOptions(bootstrap_samples=20, few_shot_ks=(4,), few_shot_seeds=(0,), zero_shot_codes=OUTCOME,
                              zero_shot_horizon_days=horizon_days, zero_shot_samples=samples,
                              zero_shot_max_new=max_new)
  report = evaluate_task(config, workdir, options)
  out = {f"{split}_{name}_auroc": round(scores["auroc"], 4) for split in ("tuning", "held_out")
         for name, scores in (("probe", report["splits"][split]["metrics"]),
                              ("zero_shot", report["splits"][split]["zero_shot"]))}
  return {**out, "held_out_rows": report["splits"]["held_out"]["n"],
          "zero_shot_seconds": report["baselines"]["zero_shot"]["description"]["seconds"]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--subjects", type=int, default=600)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--horizon_days", type=float, default=365.0)
  parser.add_argument("--samples", type=int, default=6)
  parser.add_argument("--max_new", type=int, default=8)
  parser.add_argument("--gap_share", type=float, default=0.9)
  parser.add_argument("--gap_days", type=float, default=180.0)
  parser.add_argument("--workdir", default="", help="'' = a new temporary folder")
  args = parser.parse_args()
  from biofm_jax.data.labels import read_labels, write_labels
  from biofm_jax.modalities.ehr.synthetic_labels import write_synthetic_labels
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="zero_shot_gap_"))
  pretrained = root / "gpt"
  pretrain(pretrained, args.subjects, args.steps)
  cohort = pretrained / "artifacts" / "synthetic_meds"
  plain = write_synthetic_labels(cohort, root / "high_risk.parquet", "high_risk")
  labels = read_labels(plain, {"type": "binary"})
  gapped = write_labels(root / "high_risk_gapped.parquet", labels.subject_ids,
                        gapped_prediction_times(cohort, labels.subject_ids, labels.prediction_times,
                                                args.gap_share, args.gap_days),
                        boolean_value=labels.targets["label"].astype(bool))
  events = subject_times_and_codes(cohort)
  gapped_labels = read_labels(gapped, {"type": "binary"})
  in_window = write_labels(root / "outcome_in_window_gapped.parquet", gapped_labels.subject_ids,
                           gapped_labels.prediction_times,
                           boolean_value=outcome_in_window(events, gapped_labels.subject_ids,
                                                           gapped_labels.prediction_times, args.horizon_days))
  results = {}
  for name, path in (("high risk, one minute after the last event", plain), ("high risk, gapped", gapped),
                     ("outcome code in the window, gapped", in_window)):
    results[name] = evaluate(pretrained, path, root / f"eval_{path.stem}", args.horizon_days, args.samples,
                             args.max_new)
    print(f"{name}: {results[name]}", flush=True)
  (root / "zero_shot_gap.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
  print(f"written to {root / 'zero_shot_gap.json'}")


if __name__ == "__main__":
  main()
