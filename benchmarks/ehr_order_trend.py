"""What EHR pre-training learns that counting codes cannot: the order/trend cohort (issue 33).

  python benchmarks/ehr_order_trend.py                                 # masked, next-event, MOTOR at demo
  python benchmarks/ehr_order_trend.py --objectives=masked --finetune_steps=0 \
      --finetune_set=task.embedding=ehr/last_visit_embedding             # the probe on the last visit only
  python benchmarks/ehr_order_trend.py --objectives=next --set=data.ehr.value_inputs=bins \
      --set=data.ehr.time_inputs=age+offset --name=plain_inputs          # the inputs before the demo preset's

Writes the generated cohort (`modalities/ehr/synthetic_order_trend.py`: an outcome driven by
an eGFR trend, the order of two codes and the time between the last two visits, with the
same kinds and numbers of codes for everyone) and its MEDS labels, pre-trains each objective
at `--preset` for `--steps` on it (`--set` adds config overrides, e.g. an input option), and
evaluates each on the held-out split with `evaluate_task`: the linear probe on frozen
embeddings, the count-of-codes baselines (logistic regression, gradient boosting), and, with
`--finetune_steps` > 0 (300 by default), the model fine-tuned on the labels
(configs/finetune.py:binary; `--finetune_set` adds overrides, e.g. task.embedding). The
oracle (the generating probability) and hand-made features of the three drivers (logistic
regression on the last visits' eGFR slope, which code came first and the last gap) are
scored on the same rows. AUROCs with 95% bootstrap intervals; written as JSON beside the runs.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = {"masked": "configs/ehr_bert.py", "next": "configs/ehr_gpt.py", "tte": "configs/ehr_motor.py"}
QUIET = {"train.peak_flops_per_device": 1e9, "train.log_every": 100}


def cohort(root: pathlib.Path, subjects: int, seed: int) -> tuple[pathlib.Path, pathlib.Path]:
  from biofm_jax.modalities.ehr import synthetic_order_trend as ot
  meds_root = root / "cohort"
  if not (meds_root / "metadata").exists():
    ot.write_order_trend_meds(meds_root, num_subjects=subjects, seed=seed)
  labels = root / "labels" / "outcome.parquet"
  if not labels.exists():
    ot.write_order_trend_labels(meds_root, labels)
  return meds_root, labels


def pretrain(objective: str, preset: str, meds_root: pathlib.Path, workdir: pathlib.Path, steps: int,
             overrides: dict) -> float:
  """Pre-trains (unless the run is there); returns the seconds it took (0 when reused)."""
  from biofm_jax.config import load_config
  from biofm_jax.train.loop import train_and_evaluate
  if (workdir / "checkpoints" / str(steps)).exists():
    return 0.0
  config = load_config(f"{REPO}/{CONFIGS[objective]}:{preset}", {
      **QUIET, "data.ehr.path": str(meds_root), "train.num_steps": steps, "train.eval_every": steps,
      "checkpoint.every_steps": steps, **overrides})
  start = time.perf_counter()
  train_and_evaluate(config, workdir)
  return time.perf_counter() - start


def task_config(pretrained: pathlib.Path, labels: pathlib.Path, steps: int, overrides: dict):
  from biofm_jax.config import load_config
  from biofm_jax.train.finetune import finetune_config
  return finetune_config(load_config(f"{REPO}/configs/finetune.py:binary", {
      **QUIET, "task.labels": str(labels), "train.num_steps": max(steps, 1), "train.eval_every": max(steps, 1),
      "checkpoint.every_steps": max(steps, 1), **overrides}), pretrained)


def auroc_with_interval(truth: np.ndarray, scores: np.ndarray, samples: int) -> list[float]:
  from biofm_jax.eval import metrics
  return [round(x, 4) for x in metrics.auroc_with_interval(truth, scores, num_samples=samples)]


def driver_features(meds_root: pathlib.Path, subject_ids: np.ndarray) -> np.ndarray:
  """[rows, 3] what a feature engineer who knew the rule would compute from the records:
  the eGFR slope over the last visits, whether chest pain came before the nitrate, the
  last gap between visits in days."""
  from biofm_jax.modalities.ehr import synthetic_order_trend as ot
  from biofm_jax.modalities.ehr.meds import MEDSDataset, US_PER_DAY
  source = MEDSDataset(meds_root).all_subjects()
  records = {int(record["subject_id"]): record for record in (source[i] for i in range(len(source)))}
  rows = []
  for subject in subject_ids:
    r = records[int(subject)]
    codes, times, values = np.asarray(r["codes"], object), r["times"], r["numeric_values"]
    lab = np.flatnonzero(codes == ot.LAB_CODE)[-ot.TREND_VISITS:]
    slope = np.polyfit(np.arange(len(lab)), values[lab].astype(np.float64), 1)[0]
    first = np.flatnonzero(codes == ot.FIRST_CODE)[0] < np.flatnonzero(codes == ot.SECOND_CODE)[0]
    visit_times = np.unique(times[lab].astype("datetime64[D]"))
    gap = (times[lab[-1]] - times[lab[-2]]).astype(np.int64) / US_PER_DAY if len(visit_times) > 1 else 0.0
    rows.append([slope, float(first), gap])
  return np.asarray(rows, np.float64)


def reference_scores(meds_root: pathlib.Path, report_dir: pathlib.Path, samples: int) -> dict:
  """The oracle and the hand-made driver features, on the held-out rows the report scored."""
  import pyarrow.parquet as pq
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler
  from biofm_jax.modalities.ehr import synthetic_order_trend as ot
  latents = ot.read_latents(meds_root)
  oracle = dict(zip(latents["subject_id"].tolist(), latents["oracle"].tolist()))
  held = pq.read_table(report_dir / "predictions" / "probe" / "held_out.parquet").to_pandas()
  out = {"oracle": auroc_with_interval(held.boolean_value, [oracle[s] for s in held.subject_id], samples)}
  labels = pq.read_table(meds_root.parent / "labels" / "outcome.parquet").to_pandas()
  splits = pq.read_table(meds_root / "metadata" / "subject_splits.parquet").to_pandas()
  train_rows = labels[labels.subject_id.isin(set(splits.subject_id[splits.split == "train"].tolist()))]
  train_x = driver_features(meds_root, train_rows.subject_id.to_numpy())
  scaler = StandardScaler().fit(train_x)
  model = LogisticRegression(max_iter=1000).fit(scaler.transform(train_x), train_rows.boolean_value)
  held_x = scaler.transform(driver_features(meds_root, held.subject_id.to_numpy()))
  out["driver_features_lr"] = auroc_with_interval(held.boolean_value, model.predict_proba(held_x)[:, 1], samples)
  return out


def variant_name(overrides: dict) -> str:
  return "_".join(f"{k.split('.')[-1]}-{v}".replace("/", "-") for k, v in overrides.items()) or "default"


def order_in_states(pretrained: pathlib.Path, meds_root: pathlib.Path, rows: int = 1200) -> dict[str, float]:
  """Held-out AUROC of a logistic regression telling whether chest pain came before the
  nitrate from the pre-trained model's hidden state at each of the two codes' tokens, and from
  its mean and last-visit summaries (fitted on up to `rows` training subjects; subjects whose
  window cuts either code are left out): where the order is held, and whether a summary keeps it."""
  import jax.numpy as jnp
  import pyarrow.parquet as pq
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  from biofm_jax.data import batch as B
  from biofm_jax.modalities.ehr import synthetic_order_trend as ot
  from biofm_jax.modalities.ehr.meds import MEDSDataset
  from biofm_jax.train.runs import open_run
  _, data, setup, params, _ = open_run(pretrained)
  source = MEDSDataset(meds_root).all_subjects()
  records = {int(record["subject_id"]): record for record in (source[i] for i in range(len(source)))}
  latents = ot.read_latents(meds_root)
  first = dict(zip(latents["subject_id"].tolist(), latents["first_code_first"].tolist()))
  splits = pq.read_table(meds_root / "metadata" / "subject_splits.parquet").to_pandas()
  tokenize = data.tokenizer()
  ids = data.vocab.code_ids(np.asarray([ot.FIRST_CODE, ot.SECOND_CODE], object))

  def in_window(subject) -> bool:  # both codes among the tokens (a short max_len may cut one)
    return all(np.isin(ids, tokenize.map(records[subject])[B.EHR_CODES]))

  def features(subjects) -> dict[str, np.ndarray]:
    out: dict[str, list] = {"chest_pain_token": [], "nitrate_token": [], "mean": [], "last_visit": []}
    for at in range(0, len(subjects), 64):
      examples = [tokenize.map(records[s]) for s in subjects[at: at + 64]]
      batch = {"ehr": {k: jnp.asarray(np.stack([e[k] for e in examples])) for k in examples[0]}}
      outputs = setup.model.apply({"params": params}, batch)["ehr"]
      hidden = np.asarray(outputs["hidden"], np.float32)
      for row, example in enumerate(examples):
        for name, code in zip(("chest_pain_token", "nitrate_token"), ids):
          out[name].append(hidden[row, np.flatnonzero(example[B.EHR_CODES] == code)[0]])
      out["mean"].extend(np.asarray(outputs["embedding"]))
      out["last_visit"].extend(np.asarray(outputs["last_visit_embedding"]))
    return {name: np.stack(v) for name, v in out.items()}
  train = [s for s in splits.subject_id[splits.split == "train"].tolist()[:rows] if in_window(s)]
  held = [s for s in splits.subject_id[splits.split == "held_out"].tolist() if in_window(s)]
  train_x, held_x = features(train), features(held)
  train_y, held_y = [first[s] for s in train], [first[s] for s in held]
  return {name: round(float(roc_auc_score(held_y, LogisticRegression(max_iter=3000).fit(train_x[name], train_y)
                                          .predict_proba(held_x[name])[:, 1])), 4) for name in train_x}


def evaluate(pretrained: pathlib.Path, labels: pathlib.Path, workdir: pathlib.Path, finetune_steps: int,
             finetune_overrides: dict, samples: int) -> dict:
  """The report in `workdir`, with the fine-tuning run (if any) beside it."""
  from biofm_jax.eval.downstream import EvaluationOptions, evaluate_task
  from biofm_jax.train.finetune import finetune
  finetuned = None
  if finetune_steps:
    finetuned = workdir / "finetuned"
    if not (finetuned / "checkpoints" / str(finetune_steps)).exists():
      finetune(task_config(pretrained, labels, finetune_steps, finetune_overrides), finetuned)
  options = EvaluationOptions(bootstrap_samples=samples, few_shot_ks=(), finetuned_workdir=str(finetuned or "") or None,
                              subgroups=(), overwrite=True)
  report = evaluate_task(task_config(pretrained, labels, finetune_steps, finetune_overrides), workdir / "report",
                         options)
  held = report["splits"]["held_out"]
  out = {}
  main = "finetuned" if finetuned else "probe"
  out[main] = [round(held["metrics"]["auroc"], 4), *[round(x, 4) for x in held["intervals"]["auroc"]]]
  for name, entry in report["baselines"].items():
    out[name] = [round(entry["held_out"]["metrics"]["auroc"], 4),
                 *[round(x, 4) for x in entry["held_out"]["intervals"]["auroc"]]]
  out["held_out_rows"] = held["n"]
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--objectives", default="masked,next,tte", help=f"of {sorted(CONFIGS)}")
  parser.add_argument("--preset", default="demo")
  parser.add_argument("--subjects", type=int, default=3000)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--finetune_steps", type=int, default=300, help="0: the probe only")
  parser.add_argument("--set", action="append", default=[], help="a pre-training override, e.g. model.num_layers=2")
  parser.add_argument("--finetune_set", action="append", default=[], help="a fine-tuning override")
  parser.add_argument("--bootstrap", type=int, default=200)
  parser.add_argument("--order_in_states", action="store_true",
                      help="also: can a logistic regression read the order from the hidden states at the two codes?")
  parser.add_argument("--name", default="", help="a name for this variant's runs (default: from --set)")
  parser.add_argument("--workdir", default="", help="reuse the cohort and runs here ('' = a temporary folder)")
  args = parser.parse_args()
  from biofm_jax import cli  # noqa: F401  (the CPU platform and logging, before jax starts)
  parse = lambda items: {k: v for k, _, v in (item.partition("=") for item in items)}  # noqa: E731
  overrides, finetune_overrides = parse(args.set), parse(args.finetune_set)
  root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="ehr_order_trend_"))
  meds_root, labels = cohort(root, args.subjects, args.seed)
  variant = args.name or variant_name(overrides)
  tuning = f"ft{args.finetune_steps}_{variant_name(finetune_overrides)}"
  results = {}
  for objective in args.objectives.split(","):
    run = root / f"{objective}_{args.preset}_{variant}_{args.steps}"
    seconds = pretrain(objective, args.preset, meds_root, run / "pretrained", args.steps, overrides)
    row = evaluate(run / "pretrained", labels, run / tuning, args.finetune_steps, finetune_overrides, args.bootstrap)
    row.update(reference_scores(meds_root, run / tuning / "report", args.bootstrap))
    row["pretrain_seconds"] = round(seconds, 1)
    if args.order_in_states:
      row["order_in_states_auroc"] = order_in_states(run / "pretrained", meds_root)
    results[objective] = row
    print(f"{objective} ({variant}, {args.steps} steps; {tuning}): " + ", ".join(
        f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if isinstance(v, list) else f"{k} {v}" for k, v in row.items()),
        flush=True)
  summary = {"args": vars(args), "variant": variant, "finetuning": tuning, "held_out_auroc": results}
  (root / f"ehr_order_trend_{variant}_{tuning}.json").write_text(json.dumps(summary, indent=1))
  print(json.dumps(summary, indent=1))


if __name__ == "__main__":
  main()
