"""Time-to-event pre-training against the other EHR objectives, by what a survival task gains.

  python benchmarks/motor_cindex.py                      # 2000 subjects, 1000 pre-training steps
  python benchmarks/motor_cindex.py --subjects=600 --steps=300   # quicker

On one synthetic MEDS cohort whose survival labels have a planted hazard (the latent risk
that also drives the history's codes; `synthetic_labels.py`, task planted_survival), it
pre-trains the same tiny model three ways (masked codes, next event, time to event), then
fine-tunes the survival head of each (full fine-tuning, `configs/finetune.py:survival,tiny`)
on 16, 128 and all training labels, and fits an L2-penalised Cox model on count-of-codes
features of the same histories and labels. It prints held-out C-index per cell (mean over
`--seeds` label draws; one draw for "all") and writes them as JSON beside the runs.
"""
from __future__ import annotations

import argparse
import json
import logging
import pathlib
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
OBJECTIVES = {"masked": "ehr_bert", "next event": "ehr_gpt", "time to event (MOTOR)": "ehr_motor"}


def pretrain(name: str, cohort: pathlib.Path, workdir: pathlib.Path, steps: int) -> float:
  from biofm_jax.config import load_config
  from biofm_jax.train.loop import train_and_evaluate
  if (workdir / "checkpoints" / str(steps)).exists():
    return 0.0
  config = load_config(f"{REPO}/configs/{OBJECTIVES[name]}.py:tiny", {
      "data.ehr.path": str(cohort), "train.num_steps": steps, "train.eval_every": steps, "train.log_every": 100,
      "checkpoint.every_steps": steps, "train.peak_flops_per_device": 1e9, "model.embed_dim": 64})
  start = time.perf_counter()
  train_and_evaluate(config, workdir)
  return time.perf_counter() - start


def finetuned_c_index(pretrained: pathlib.Path, workdir: pathlib.Path, labels: int, seed: int) -> float:
  from biofm_jax.config import load_config
  from biofm_jax.eval.finetuned import score_finetuned
  from biofm_jax.train.finetune import finetune, finetune_config
  config = finetune_config(load_config(f"{REPO}/configs/finetune.py:survival,tiny", {
      "finetune.train_labels_per_class": labels, "finetune.label_seed": seed, "train.peak_flops_per_device": 1e9,
      "train.num_steps": 150, "train.eval_every": 150, "checkpoint.every_steps": 150}), pretrained)
  finetune(config, workdir)
  return float(score_finetuned(workdir, config, splits=("held_out",))["held_out"]["c_index"])


def cox_on_counts_c_index(data, labels: int, seed: int) -> float:
  """Held-out C-index of penalised Cox on count-of-codes features, from `labels` training
  rows (0 = all) of `data` (the labelled histories, opened once by `labelled_data`)."""
  from biofm_jax.eval import classical, metrics
  from biofm_jax.eval.downstream import classical_targets
  from biofm_jax.train.finetune import few_label_rows
  train_labels, test_labels = data.split_labels("train"), data.split_labels("held_out")
  rows = few_label_rows(train_labels, labels, seed) if labels else np.arange(len(train_labels))
  train_records = data.records("train")
  featurizer = classical.CodeCountFeaturizer().fit([train_records[i] for i in rows])
  targets = classical_targets(train_labels, data.info)
  risk = classical.fit_predict("logistic", "survival", featurizer.transform([train_records[i] for i in rows]),
                               {k: np.asarray(v)[rows] for k, v in targets.items()},
                               featurizer.transform(data.records("held_out")))
  return float(metrics.task_metrics("survival", test_labels.metric_targets(), risk)["c_index"])


def labelled_data(pretrained: pathlib.Path, artifacts: pathlib.Path):
  """The survival task's labelled histories, tokenised as `pretrained` was."""
  from biofm_jax.config import load_config
  from biofm_jax.train.finetune import finetune_config, open_labeled_data
  config = finetune_config(load_config(f"{REPO}/configs/finetune.py:survival,tiny",
                                       {"train.peak_flops_per_device": 1e9}), pretrained)
  return open_labeled_data(config, artifacts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--subjects", type=int, default=2000)
  parser.add_argument("--steps", type=int, default=1000)
  parser.add_argument("--labels", default="16,128,0", help="training labels per cell; 0 = all")
  parser.add_argument("--seeds", type=int, default=3, help="label draws per few-label cell")
  parser.add_argument("--workdir", default="")
  args = parser.parse_args()
  logging.basicConfig(level=logging.WARNING)
  from biofm_jax.modalities.ehr.synthetic import write_synthetic_meds
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="motor_cindex_"))
  cohort = root / "cohort"
  if not cohort.exists():
    write_synthetic_meds(cohort, num_subjects=args.subjects, seed=0)
  ks = [int(k) for k in args.labels.split(",")]
  table: dict[str, dict[str, float]] = {}
  timings = {}
  for name in OBJECTIVES:
    run = root / OBJECTIVES[name]
    timings[name] = pretrain(name, cohort, run, args.steps)
    if "Cox on code counts" not in table:  # the same labels and histories, from the first run's tokenisation
      table["Cox on code counts"] = {}
      data = labelled_data(run, root / "cox_artifacts")
      for k in ks:
        seeds = range(args.seeds) if k else [0]
        scores = [cox_on_counts_c_index(data, k, s) for s in seeds]
        table["Cox on code counts"][str(k or "all")] = float(np.mean(scores))
        print(f"{'Cox on code counts':24s} labels {k or 'all':>4}: C-index {np.mean(scores):.3f}", flush=True)
    table[name] = {}
    for k in ks:
      seeds = range(args.seeds) if k else [0]
      scores = [finetuned_c_index(run, root / f"ft_{OBJECTIVES[name]}_{k}_{s}", k, s) for s in seeds]
      table[name][str(k or "all")] = float(np.mean(scores))
      print(f"{name:24s} labels {k or 'all':>4}: C-index {np.mean(scores):.3f} "
            f"({', '.join(f'{x:.3f}' for x in scores)})", flush=True)
  header = " | ".join(str(k or "all") for k in ks)
  print(f"\nheld-out C-index ({args.subjects} subjects, {args.steps} pre-training steps; labels per cell: {header})")
  print(f"| model | {header} |\n|---|" + "---|" * len(ks))
  for name, cells in table.items():
    print(f"| {name} | " + " | ".join(f"{cells[str(k or 'all')]:.3f}" for k in ks) + " |")
  (root / "motor_cindex.json").write_text(json.dumps({"c_index": table, "pretrain_s": timings,
                                                      "subjects": args.subjects, "steps": args.steps}, indent=1))
  print(f"written to {root / 'motor_cindex.json'}")


if __name__ == "__main__":
  main()
