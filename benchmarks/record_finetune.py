"""Fine-tuning a record model with few labels, beside its linear probe, the same architecture
trained from scratch and the modality's raw-feature baseline (issue 31's imaging target).

  python benchmarks/record_finetune.py                                   # 2D lesion, 600 images
  python benchmarks/record_finetune.py --spec=configs/imaging_mae3d.py:tiny --subjects=300
  python benchmarks/record_finetune.py --spec=configs/ecg_mae.py:tiny --label=afib \
      --set=data.ecg.length=1000 --set=data.ecg.patch_size=50        # 10 s windows

Pre-trains the tiny MAE of `--spec` on its synthetic records (`--subjects`, `--pretrain_steps`),
then, for each k in `--ks` labels per class (0: every training label), on the same
training rows: fine-tunes it fully (`--finetune_steps`), trains the same architecture from
scratch for as many steps, fits a logistic probe on the frozen pre-trained embeddings and
the modality's raw-feature baseline (`eval/raw_baselines.py`). Prints the held-out AUROC of
each and writes them as JSON beside the runs. `--finetune_set` changes the fine-tuning recipe
of the fine-tuned and from-scratch runs (`configs/finetune.py:binary` by default), `--name`
keeps that variant's runs apart in the same `--workdir`.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
QUIET = {"train.peak_flops_per_device": 1e9, "train.log_every": 100}


def modality_of(spec: str) -> str:
  from biofm_jax.config import load_config
  from biofm_jax.modalities.registry import configured
  return configured(load_config(f"{REPO}/{spec}", {}).data)[0]


def pretrain(spec: str, workdir: pathlib.Path, subjects: int, steps: int, overrides: dict) -> pathlib.Path:
  from biofm_jax.config import load_config
  from biofm_jax.train.loop import train_and_evaluate
  if not (workdir / "checkpoints" / str(steps)).exists():
    modality = modality_of(spec)
    config = load_config(f"{REPO}/{spec}", {**QUIET, "train.num_steps": steps, "train.eval_every": 0,
                                            "checkpoint.every_steps": steps,
                                            f"data.{modality}.synthetic_subjects": subjects, **overrides})
    train_and_evaluate(config, workdir)
  return workdir


def task_config(pretrained: pathlib.Path, label: str, k: int, steps: int, init: str, overrides: dict | None = None):
  from biofm_jax.config import load_config
  from biofm_jax.train.finetune import finetune_config
  return finetune_config(load_config(f"{REPO}/configs/finetune.py:binary", {
      **QUIET, "task.label_column": label, "finetune.train_labels_per_class": k, "finetune.init": init,
      "train.num_steps": steps, "train.eval_every": steps, "checkpoint.every_steps": steps, **(overrides or {})}),
      pretrained)


def held_out_auroc(config, workdir: pathlib.Path) -> float:
  from biofm_jax.eval.finetuned import score_finetuned
  from biofm_jax.train.finetune import finetune
  finetune(config, workdir)
  return float(score_finetuned(workdir, config, splits=("held_out",))["held_out"]["auroc"])


def classical_aurocs(config, workdir: pathlib.Path) -> dict[str, float]:
  """The probe on frozen embeddings and the raw-feature baselines, on the run's training rows,
  as the evaluation report fits them: {method: held-out AUROC}."""
  from biofm_jax.eval import downstream, metrics
  from biofm_jax.train.finetune import open_labeled_data
  data = open_labeled_data(config, workdir / "artifacts")
  truth = data.split_labels("held_out").metric_targets()
  scores, _, _ = downstream.classical_scores(config, data, ("held_out",))
  return {name: float(metrics.task_metrics("binary", truth, by_split["held_out"])["auroc"])
          for name, by_split in scores.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--spec", default="configs/imaging_mae.py:tiny")
  parser.add_argument("--label", default="lesion")
  parser.add_argument("--subjects", type=int, default=600)
  parser.add_argument("--pretrain_steps", type=int, default=300)
  parser.add_argument("--finetune_steps", type=int, default=120)
  parser.add_argument("--ks", default="16,64,0", help="labels per class; 0 = every training label")
  parser.add_argument("--set", action="append", default=[],
                      help="a pre-training config override, e.g. data.ecg.length=1000 (fine-tuning inherits data.*)")
  parser.add_argument("--finetune_set", action="append", default=[],
                      help="a fine-tuning override for the fine-tuned and the from-scratch runs, e.g. "
                           "checkpoint.best_metric=eval/loss")
  parser.add_argument("--name", default="", help="a name for this fine-tuning variant's runs")
  parser.add_argument("--workdir", default="", help="reuse runs here ('' = a temporary folder)")
  args = parser.parse_args()
  parse = lambda items: {key: value for key, _, value in (item.partition("=") for item in items)}  # noqa: E731
  overrides, tuning = parse(args.set), parse(args.finetune_set)  # values are parsed by the config
  suffix = f"_{args.name}" if args.name else ""
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="record_finetune_"))
  pretrained = pretrain(args.spec, root / "pretrained", args.subjects, args.pretrain_steps, overrides)
  results = {}
  for k in (int(x) for x in args.ks.split(",")):
    config = lambda init: task_config(pretrained, args.label, k, args.finetune_steps, init, tuning)  # noqa: E731
    row = {"finetuned": held_out_auroc(config("pretrained"), root / f"finetuned_k{k}{suffix}"),
           "from_scratch": held_out_auroc(config("scratch"), root / f"scratch_k{k}{suffix}")}
    row.update(classical_aurocs(config("pretrained"), root / f"finetuned_k{k}{suffix}"))
    results["all" if k == 0 else f"k={k}"] = row
    print(f"{args.label} held-out AUROC, {'all labels' if k == 0 else f'{k} labels per class'}: "
          + ", ".join(f"{name} {value:.3f}" for name, value in row.items()), flush=True)
  summary = {"spec": args.spec, "overrides": args.set, "finetune_overrides": args.finetune_set, "label": args.label,
             "subjects": args.subjects,
             "pretrain_steps": args.pretrain_steps,
             "finetune_steps": args.finetune_steps, "held_out_auroc": results}
  (root / f"record_finetune{suffix}.json").write_text(json.dumps(summary, indent=2))
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  main()
