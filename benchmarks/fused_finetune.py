"""The fused patient model on a label that needs two modalities together (issue 31's fused
target), beside each modality alone, the same architecture from scratch, the frozen probe
and HAIM's recipe.

  python benchmarks/fused_finetune.py                      # 3,000 subjects, make demo's model
  python benchmarks/fused_finetune.py --subjects=1000 --pretrain_steps=100 --finetune_steps=60

Writes the synthetic multimodal cohort (`modalities/synthetic_cohort.py`) with `--subjects`
subjects and pre-trains `--spec` on it through the modalities' own paths, as a user's run
would. The label is the cohort's `aggressive`: a lesion (seen in the image) whose tumour
expression program (seen only in the expression profile) is on, so neither modality alone
can tell it. On that label, with the same training rows and the `binary` fine-tuning preset:

  fused         the pre-trained fused model fine-tuned, every subject with what it has
  <modality>    the same, with every other modality withheld from every subject
                (`finetune.withhold`): what that modality alone carries
  from_scratch  the fused architecture trained from initialisation for as many steps
  probe         logistic regression on the frozen fused embedding
  haim_gbm      HAIM: each modality's raw features with absent indicators, gradient boosting

Held-out AUROC with 95% bootstrap intervals, on the held-out subjects who have both the
image and the expression profile (every model sees the same rows there) and on every
held-out subject a model scores. Written as JSON beside the runs. `--finetune_set` changes
the recipe of every fine-tuned and from-scratch run; `--name` keeps that variant's runs apart
in the same `--workdir`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET = {"train.peak_flops_per_device": 1e9, "train.log_every": 100}
LABEL = "aggressive"
NEEDS = ("imaging", "omics")  # the modalities the label reads


def write_cohort(root: pathlib.Path, subjects: int, seed: int) -> tuple[dict, pathlib.Path]:
  """The cohort's paths and a labels table of `aggressive` keyed by subject."""
  import pandas as pd
  import pyarrow as pa
  import pyarrow.parquet as pq

  from biofm_jax.modalities.synthetic_cohort import LATENTS_FILENAME, write_synthetic_multimodal
  paths = write_synthetic_multimodal(root / "cohort", num_subjects=subjects, seed=seed)
  truth = pd.read_csv(root / "cohort" / LATENTS_FILENAME)
  labels = root / f"{LABEL}.parquet"
  pq.write_table(pa.table({"subject_id": pa.array(truth["subject_id"].to_numpy(np.int64)),
                           "boolean_value": pa.array(truth[LABEL].to_numpy(bool))}), labels)
  return {m: str(p) for m, p in paths.items()}, labels


def pretrain(spec: str, workdir: pathlib.Path, paths: dict, steps: int, overrides: dict) -> pathlib.Path:
  from biofm_jax.config import load_config
  from biofm_jax.train.loop import train_and_evaluate
  if not (workdir / "checkpoints" / str(steps)).exists():
    config = load_config(f"{REPO}/{spec}", {
        **QUIET, "train.num_steps": steps, "train.eval_every": 0, "checkpoint.every_steps": steps,
        **{f"data.{m}.path": p for m, p in paths.items()}, **overrides})
    train_and_evaluate(config, workdir)
  return workdir


def task_config(pretrained: pathlib.Path, labels: pathlib.Path, steps: int, init: str, withhold: tuple,
                overrides: dict):
  from biofm_jax.config import load_config
  from biofm_jax.train.finetune import finetune_config
  return finetune_config(load_config(f"{REPO}/configs/finetune.py:binary", {
      **QUIET, "task.labels": str(labels), "finetune.init": init, "finetune.withhold": withhold,
      **({"train.num_steps": steps} if steps else {}), **overrides}), pretrained)


def finetuned_scores(config, workdir: pathlib.Path) -> dict[int, float]:
  """subject id -> held-out probability of the fine-tuned run (trained here once)."""
  from biofm_jax.eval.finetuned import predict_finetuned
  from biofm_jax.train.finetune import finetune
  if not (workdir / "checkpoints").exists() or not any((workdir / "checkpoints").iterdir()):
    finetune(config, workdir)
  data, predicted = predict_finetuned(workdir, config, splits=("held_out",))
  ids = data.split_labels("held_out").subject_ids
  return dict(zip((int(s) for s in ids), np.asarray(predicted["held_out"], np.float64).tolist()))


def classical_scores(config, artifacts: pathlib.Path) -> dict[str, dict[int, float]]:
  """The probe on frozen fused embeddings and HAIM, fitted on the same training rows, as the
  evaluation report fits them: {method: {subject: held-out score}}."""
  from biofm_jax.eval import downstream
  from biofm_jax.train.finetune import open_labeled_data
  data = open_labeled_data(config, artifacts)
  ids = [int(s) for s in data.split_labels("held_out").subject_ids]
  scores, _, _ = downstream.classical_scores(config, data, ("held_out",))
  return {name: dict(zip(ids, np.asarray(by_split["held_out"], np.float64).reshape(len(ids), -1)[:, -1].tolist()))
          for name, by_split in scores.items()}


def main() -> None:
  import pandas as pd

  from biofm_jax.eval import metrics
  from biofm_jax.modalities.synthetic_cohort import LATENTS_FILENAME, MODALITIES
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--spec", default="configs/multimodal_fusion.py:demo")
  parser.add_argument("--subjects", type=int, default=3000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--pretrain_steps", type=int, default=400)
  parser.add_argument("--finetune_steps", type=int, default=0, help="0: the binary preset's")
  parser.add_argument("--alone", default=",".join(MODALITIES), help="modalities to fine-tune on alone")
  parser.add_argument("--bootstrap", type=int, default=200)
  parser.add_argument("--set", action="append", default=[], help="a pre-training config override")
  parser.add_argument("--finetune_set", action="append", default=[], help="a fine-tuning config override")
  parser.add_argument("--name", default="", help="a name for this fine-tuning variant's runs")
  parser.add_argument("--workdir", default="", help="reuse runs here ('' = a temporary folder)")
  args = parser.parse_args()
  parse = lambda items: {key: value for key, _, value in (item.partition("=") for item in items)}  # noqa: E731
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="fused_finetune_"))
  paths, labels = write_cohort(root, args.subjects, args.seed)
  pretrained = pretrain(args.spec, root / "pretrained", paths, args.pretrain_steps, parse(args.set))
  tuning = parse(args.finetune_set)
  config = lambda init, withhold=(): task_config(pretrained, labels, args.finetune_steps, init,  # noqa: E731
                                                 withhold, tuning)
  suffix = f"_{args.name}" if args.name else ""
  scores = {"fused": finetuned_scores(config("pretrained"), root / f"fused{suffix}")}
  for m in (x for x in args.alone.split(",") if x):
    scores[m] = finetuned_scores(config("pretrained", tuple(o for o in MODALITIES if o != m)),
                                 root / f"only_{m}{suffix}")
  scores["from_scratch"] = finetuned_scores(config("scratch"), root / f"from_scratch{suffix}")
  scores.update(classical_scores(config("pretrained"), root / f"fused{suffix}" / "artifacts"))

  truth = pd.read_csv(root / "cohort" / LATENTS_FILENAME).set_index("subject_id")
  held = truth[truth["split"] == "held_out"]
  both = held.index[(held[[f"has_{m}" for m in NEEDS]] == 1).all(axis=1)]
  results: dict = {"both": {}, "scored": {}}
  for name, by_subject in scores.items():
    for subset, ids in (("both", both), ("scored", held.index)):
      ids = [s for s in ids if s in by_subject]  # a model given one modality scores only those who have it
      y = held.loc[ids, LABEL].to_numpy(np.float64)
      value = metrics.auroc_with_interval(y, [by_subject[s] for s in ids], num_samples=args.bootstrap)
      results[subset][name] = [*(round(x, 4) for x in value), len(ids)]
  print(f"{LABEL}: held-out AUROC [95% interval] on the {len(both)} held-out subjects with "
        f"{' and '.join(NEEDS)} (positive rate {held.loc[both, LABEL].mean():.2f}; n: those each model scores):")
  for name, (value, low, high, n) in results["both"].items():
    print(f"  {name:>14s}  {value:.3f} [{low:.3f}, {high:.3f}]  n={n}")
  print("on every held-out subject each scores:")
  for name, (value, low, high, n) in results["scored"].items():
    print(f"  {name:>14s}  {value:.3f} [{low:.3f}, {high:.3f}]  n={n}")
  summary = {"spec": args.spec, "subjects": args.subjects, "pretrain_steps": args.pretrain_steps,
             "finetune_steps": args.finetune_steps, "overrides": args.set, "finetune_overrides": args.finetune_set,
             "label": LABEL, "held_out_with_both": len(both), "held_out_auroc": results}
  (root / f"fused_finetune{suffix}.json").write_text(json.dumps(summary, indent=2))
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
