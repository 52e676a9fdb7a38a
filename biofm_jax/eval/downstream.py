"""Validation of a pre-trained model on a labelled task, with the baselines a reviewer asks for.

`evaluate_task` scores, on the same splits and labels:
  * the foundation model: a linear probe on its frozen embeddings (the standard quick
    measure), or a fine-tuned run of it (`finetuned_workdir`), with the probe then listed
    among the comparisons;
  * classical baselines on the same rows, by what the labels are (`raw_baselines.py`):
    count-of-codes logistic regression and gradient boosting for EHR label rows (EHRSHOT's),
    the modality's raw-feature baseline for a record label column, HAIM's concatenated
    features with missingness indicators and gradient boosting for a fused model;
  * the same architecture trained from scratch on the same labels (`from_scratch_steps`);
  * a few-shot sweep (k labels per class, several seeds) of the probe and the count baselines;
and writes the report (`report.py`): metrics per split, bootstrap intervals, subgroups (for
a fused model always also per availability pattern, `modalities`),
curves, and summary lines that say whether and by how much pre-training helps; and every
model's per-row predictions in meds-evaluation's schema (`prediction_files.py`).

A split whose labels leave the primary metric undefined (a held-out split with one class:
no AUROC) is warned about before any model is scored, naming the split, the task and the
class counts; the report records why (`splits.<split>.undefined`) and its summary says the
models are not compared on that split rather than leaving it out.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from biofm_jax.data import batch as B
from biofm_jax.modalities.ehr.task_data import SUBGROUP_CODE_PREFIXES, UNKNOWN
from biofm_jax.data.record_task import AVAILABILITY
from biofm_jax.eval import classical, metrics, prediction_files, raw_baselines, report as report_lib
from biofm_jax.eval.raw_baselines import COUNT_GBM, COUNT_LOGISTIC, HAIM  # noqa: F401 (report names)
from biofm_jax.eval import finetuned as finetuned_lib
from biofm_jax.eval import zero_shot
from biofm_jax.train import finetune
from biofm_jax.train.runs import open_run
from biofm_jax.train.embed import embed_split

log = logging.getLogger("biofm_jax")
# Model names: report.json's keys and the predictions/<model>/ folders.
PROBE, SCRATCH, FINETUNED = "probe", "from_scratch", "finetuned"  # and raw_baselines' names
ZERO_SHOT = "zero_shot"
DEFAULT_SUBGROUPS = ("sex", "age_band", "race", "ethnicity")


@dataclasses.dataclass(frozen=True)
class EvaluationOptions:
  splits: tuple[str, ...] = ("tuning", "held_out")
  subgroups: tuple[str, ...] = DEFAULT_SUBGROUPS  # covariate columns; defaults that cannot be formed are noted
  # subgroup -> code prefixes: a row's value is the suffix of its record's first such code
  subgroup_codes: tuple[tuple[str, tuple[str, ...]], ...] = tuple(SUBGROUP_CODE_PREFIXES.items())
  bootstrap_samples: int = 200
  few_shot_ks: tuple[int, ...] = classical.DEFAULT_KS
  few_shot_seeds: tuple[int, ...] = (0, 1, 2)
  finetuned_workdir: str | None = None
  from_scratch_steps: int = 0  # > 0: train the architecture from scratch for this many steps
  # Zero-shot by simulated futures (`zero_shot.py`; next-event runs, binary tasks): outcome codes
  # (exact, or prefixes ending in *), the horizon, futures per label row, events per future (0: max_len / 2)
  zero_shot_codes: tuple[str, ...] = ()
  zero_shot_horizon_days: float = 365.0
  zero_shot_samples: int = 20
  zero_shot_max_new: int = 0
  seed: int = 0
  overwrite: bool = False  # replace an existing predictions/ folder


def classical_targets(labels, info):
  """Training targets in the form `classical.fit_predict` takes."""
  if info.type == "survival":
    return {"time": labels.targets[B.TASK_TIME], "event": labels.targets[B.TASK_EVENT]}
  y = labels.targets[B.TASK_LABEL]
  return y.astype(np.int64) if info.type in ("binary", "multiclass") else y


def fit_predict_task(model: str, info, train_x, train_y, test_x, seed: int = 0) -> np.ndarray:
  """`classical.fit_predict`, with multilabel tasks fitted as one binary model per label."""
  if info.type == "multilabel":
    return np.stack([classical.fit_predict(model, "binary", train_x, train_y[:, j].astype(np.int64), test_x,
                                           seed=seed) for j in range(train_y.shape[1])], axis=1)
  num_classes = info.num_outputs if info.type == "multiclass" else None
  return classical.fit_predict(model, info.type, train_x, train_y, test_x, seed=seed, num_classes=num_classes)


def frozen_embeddings(config: ml_collections.ConfigDict, data, splits: Sequence[str]) -> dict[str, np.ndarray]:
  """{split: [rows, D]} pooled embeddings of the pre-trained backbone (no head, no training)."""
  frozen = ml_collections.ConfigDict(config.to_dict())
  frozen.finetune.mode = "frozen"
  if "pooling" in frozen.task:  # the linear probe reads the summary (an attention pool is trained, not read)
    frozen.task.pooling = "summary"
  setup = finetune.build_finetune_training(frozen, data)
  state = finetune.load_pretrained(setup.init_state(config.seed), setup, config.finetune.pretrained)
  return {split: embed_split(setup, state.params, data, split, batch_size=config.data.batch_size,
                             output=("task", "embedding")) for split in splits}


def train_from_scratch(config: ml_collections.ConfigDict, workdir: pathlib.Path, num_steps: int) -> pathlib.Path:
  """Trains the fine-tuning architecture from random initialisation on the same labels."""
  scratch = ml_collections.ConfigDict(config.to_dict())
  scratch.finetune.update(init="scratch", mode="full")
  scratch.train.num_steps = num_steps
  scratch.train.eval_every = num_steps
  scratch.checkpoint.every_steps = num_steps
  finetune.finetune(scratch, workdir)
  return workdir


def _finetuned_scores(workdir, splits, expected) -> tuple[dict[str, np.ndarray], dict]:
  """Scores of a fine-tuning run on `splits`, checked to be of the same task and rows as
  the evaluation's (`expected`: its labelled data module)."""
  config, data, setup, params, _ = open_run(workdir)
  if data.info.type != expected.info.type:
    raise ValueError(f"the run in {workdir} was fine-tuned for a {data.info.type} task, but the evaluation is of "
                     f"a {expected.info.type} task; evaluate with that run's task config")
  for split in splits:
    ours, theirs = data.split_labels(split), expected.split_labels(split)
    if not (np.array_equal(ours.subject_ids, theirs.subject_ids)  # NaT (subject-level rows) equals NaT
            and np.array_equal(ours.prediction_times, theirs.prediction_times, equal_nan=True)):
      raise ValueError(f"the run in {workdir} was fine-tuned on other {split} label rows ({ours.path}) than the "
                       f"evaluation's ({theirs.path}); use the same labels")
  scores = {s: finetuned_lib.predict_split(setup, params, data, s, batch_size=config.data.batch_size)[0] for s in splits}
  return scores, {"workdir": str(workdir), "mode": config.finetune.mode, "init": config.finetune.init,
                  "steps": config.train.num_steps, "train_labels": len(data.split_labels("train"))}


def _split_entry(info, targets, scores, covariates, options: EvaluationOptions, *, with_details: bool) -> dict:
  entry = {"n": int(len(scores)), "metrics": metrics.task_metrics(info.type, targets, scores)}
  if with_details:
    entry["intervals"] = metrics.bootstrap_intervals(info.type, targets, scores,
                                                     num_samples=options.bootstrap_samples, seed=options.seed)
    groups, not_formed = subgroup_columns(options, covariates)
    if groups:
      entry["subgroups"] = metrics.subgroup_metrics(info.type, targets, scores, groups)
    if not_formed:
      entry["subgroups_not_formed"] = not_formed
  return entry


def subgroup_columns(options: EvaluationOptions, covariates: dict) -> tuple[dict, dict[str, str]]:
  """({column: values} of the subgroups that can be formed, {column: why not} of the others):
  a column every row of which is unknown forms no subgroup."""
  prefixes = dict(options.subgroup_codes)
  groups, not_formed = {}, {}
  for column in options.subgroups:
    values = covariates.get(column)
    if values is None:
      not_formed[column] = "no such column in the labels"
    elif all(metrics.group_key(v) in (metrics.MISSING, UNKNOWN) for v in values):
      source = (f"no record has a code starting with {' or '.join(prefixes[column])}" if column in prefixes
                else "no row has a value")
      not_formed[column] = f"every row is unknown: {source}"
    else:
      groups[column] = values
  return groups, not_formed


def _check_subgroups(options: EvaluationOptions, covariates: dict) -> None:
  known = set(DEFAULT_SUBGROUPS) | {name for name, _ in options.subgroup_codes}
  unknown = [c for c in options.subgroups if c not in covariates and c not in known]
  if unknown:
    raise ValueError(f"subgroup columns {unknown} are not in the labels file; covariates available: "
                     f"{sorted(covariates)}")


def undefined_primary_metric(task_type: str, targets: dict, classes: Sequence[str] = ()) -> str | None:
  """Why a split's labels leave the task's primary metric undefined (None when they do not):
  the class counts of a one-class split, no event, or one target value."""
  if task_type == "survival":
    event = np.asarray(targets["event"], bool)
    return None if event.any() else f"no event among its {len(event)} rows (C-index needs one)"
  label = np.asarray(targets["label"])
  if task_type == "regression":
    return None if len(label) and np.ptp(label) > 0 else f"one target value in all its {len(label)} rows"
  if task_type == "multilabel":
    positives = label.reshape(len(label), -1).sum(axis=0).astype(int)
    if ((positives > 0) & (positives < len(label))).any():
      return None
    names = list(classes) or [str(j) for j in range(len(positives))]
    return ("no label with both outcomes (positives: "
            + ", ".join(f"{n} {p} of {len(label)}" for n, p in zip(names, positives)) + ")")
  names = list(classes) if task_type == "multiclass" and classes else ["0", "1"]
  counts = np.bincount(label.astype(np.int64).reshape(-1), minlength=len(names))
  if np.count_nonzero(counts) >= 2:
    return None
  return "one class (" + ", ".join(f"class {n}: {int(c)} rows" for n, c in zip(names, counts)) + ")"


def warn_undefined_metrics(task_name: str, info, targets: dict) -> dict[str, str]:
  """{split: why} for the splits whose primary metric is undefined, each warned about once."""
  metric = metrics.primary_metric(info.type)
  undefined = {s: why for s, t in targets.items()
               if (why := undefined_primary_metric(info.type, t, getattr(info, "classes", ()))) is not None}
  for split, why in undefined.items():
    others = [s for s in targets if s not in undefined]
    log.warning("evaluation of task %r: the %s split has %s, so its %s is undefined; the summary compares the "
                "models on %s only", task_name, split, why, metric, " and ".join(others) or "no split")
  return undefined


def task_description(config: ml_collections.ConfigDict, data) -> dict:
  """The report's task section: name, type, labels, rows per split and the rows dropped."""
  train = data.split_labels("train")
  return {"name": config.task.name, "type": data.info.type, "labels": str(train.path),
          "prediction_time_cut": data.cut, "rows": {s: len(data.split_labels(s)) for s in data.splits()},
          "rows_dropped": data.dropped, "outputs": data.info.num_outputs}


def classical_scores(config: ml_collections.ConfigDict, data, splits: Sequence[str], seed: int = 0):
  """The linear probe on the backbone's frozen embeddings and each raw-feature baseline the
  modality registers (HAIM's for a fused model), each fitted on the training rows and scored
  on `splits`: (scores {method: {split: scores}}, descriptions {method: ...}, and each
  method's features {method: ({split: [N, F]}, its classical model)}, train included)."""
  info, train_y = data.info, classical_targets(data.split_labels("train"), data.info)
  log.info("evaluation: embedding %s with the pre-trained backbone", ", ".join(("train",) + tuple(splits)))
  features = {PROBE: (frozen_embeddings(config, data, ("train",) + tuple(splits)), "logistic")}
  descriptions = {PROBE: {"method": "logistic/ridge/Cox regression on frozen pooled embeddings"}}
  for name, b in raw_baselines.baselines(data, ("train",) + tuple(splits)).items():
    if info.type == "multilabel" or info.type in classical.SUPPORTED_TASKS[b.model]:
      features[name], descriptions[name] = (b.features, b.model), b.description
  scores = {name: {s: fit_predict_task(method, info, x["train"], train_y, x[s], seed) for s in splits}
            for name, (x, method) in features.items()}
  return scores, descriptions, features


def evaluate_task(config: ml_collections.ConfigDict, out_dir: str | pathlib.Path,
                  options: EvaluationOptions = EvaluationOptions()) -> dict[str, Any]:
  """Scores everything above for `config` (a `finetune.finetune_config`) and writes the
  report into `out_dir`; returns the report dict."""
  out_dir = pathlib.Path(out_dir).absolute()
  prediction_files.check_writable(out_dir, options.overwrite)
  out_dir.mkdir(parents=True, exist_ok=True)
  data = finetune.open_labeled_data(config, out_dir / "artifacts")
  info, splits = data.info, tuple(options.splits)
  labels = {s: data.split_labels(s) for s in ("train",) + splits}
  targets = {s: labels[s].metric_targets() for s in splits}
  covariates = {s: data.covariates(s, dict(options.subgroup_codes)) for s in splits}
  if AVAILABILITY in covariates[splits[-1]] and AVAILABILITY not in options.subgroups:
    # A fused model's results per availability pattern (EHR only, EHR + imaging, ...) are always reported.
    options = dataclasses.replace(options, subgroups=options.subgroups + (AVAILABILITY,))
  _check_subgroups(options, covariates[splits[-1]])
  undefined = warn_undefined_metrics(config.task.name, info, targets)  # before the models are scored
  train_y = classical_targets(labels["train"], info)

  scores, descriptions, features = classical_scores(config, data, splits, options.seed)
  if options.from_scratch_steps:
    log.info("evaluation: training the architecture from scratch for %d steps", options.from_scratch_steps)
    scratch_dir = train_from_scratch(config, out_dir / "from_scratch", options.from_scratch_steps)
    scores[SCRATCH], descriptions[SCRATCH] = _finetuned_scores(scratch_dir, splits, data)
  if options.zero_shot_codes:
    if info.type != "binary":
      raise ValueError(f"zero-shot prediction scores binary tasks (an outcome within a horizon); this task is "
                       f"{info.type}")
    log.info("evaluation: simulating %d futures per label row for zero-shot %s", options.zero_shot_samples,
             ", ".join(options.zero_shot_codes))
    scores[ZERO_SHOT], descriptions[ZERO_SHOT] = zero_shot.zero_shot_scores(
        config.finetune.pretrained, data, splits, options.zero_shot_codes, horizon_days=options.zero_shot_horizon_days,
        samples=options.zero_shot_samples, max_new=options.zero_shot_max_new, seed=options.seed)
  main_method = PROBE
  if options.finetuned_workdir:
    main_method = FINETUNED
    scores[main_method], descriptions[main_method] = _finetuned_scores(options.finetuned_workdir, splits, data)
  few_shot = {name: (x["train"], x["held_out"], method) for name, (x, method) in features.items()} \
      if "held_out" in splits else {}
  model = {"name": main_method, "pretrained": config.finetune.pretrained, **descriptions[main_method]}
  row_ids = {s: prediction_files.label_row_ids(labels[s]) for s in splits}
  return write_evaluation(out_dir, task_description(config, data), model, info, scores, descriptions, targets,
                          covariates, train_y, few_shot, options, row_ids=row_ids, undefined=undefined)


def write_evaluation(out_dir, task: dict, model: dict, info, scores: dict[str, dict[str, np.ndarray]],
                     descriptions: dict, targets: dict, covariates: dict, train_y, few_shot_features: dict,
                     options: EvaluationOptions, *, row_ids: dict[str, tuple],
                     undefined: dict[str, str] | None = None) -> dict[str, Any]:
  """The report of `scores` ({method: {split: predictions}}, `model["name"]` the main one),
  written into `out_dir`: metrics per split, intervals and subgroups on held_out, the other
  methods as baselines, the few-shot sweep of `few_shot_features`, curves and summary; and
  every method's predictions of every split (`row_ids`: {split: {id column: values}}) under
  `out_dir/predictions/`. `undefined`: {split: why its primary metric is undefined}, as
  `warn_undefined_metrics` found and warned about (None: found and warned about here)."""
  main_method, splits = model["name"], tuple(options.splits)
  if undefined is None:
    undefined = warn_undefined_metrics(task["name"], info, {s: targets[s] for s in splits})
  prediction_files.write_predictions(out_dir, {
      name: {s: prediction_files.prediction_table(info.type, row_ids[s], targets[s], by_split[s], info.classes)
             for s in splits} for name, by_split in scores.items()}, overwrite=options.overwrite)
  report: dict[str, Any] = {
      "task": task, "model": model,
      "splits": {s: _split_entry(info, targets[s], scores[main_method][s], covariates[s], options,
                                 with_details=s == "held_out") for s in splits},
      "baselines": {name: {**{s: _split_entry(info, targets[s], by_split[s], covariates[s], options,
                                              with_details=s == "held_out") for s in splits},
                           "description": descriptions[name]}
                    for name, by_split in scores.items() if name != main_method},
  }
  for s, why in undefined.items():  # the report says why a metric is absent, not just "n/a"
    report["splits"][s]["undefined"] = {metrics.primary_metric(info.type): why}
  for s in splits:  # zero-shot also sits beside the main model's metrics, where readers look first
    if ZERO_SHOT in report["baselines"]:
      report["splits"][s][ZERO_SHOT] = report["baselines"][ZERO_SHOT][s]["metrics"]
  if info.type in ("binary", "multiclass") and few_shot_features:
    report["few_shot"] = few_shot_report(info, train_y, targets["held_out"], few_shot_features, options)
  report["summary"] = (report_lib.summary_lines(report) + pretraining_lines(report, main_method)
                       + dropped_rows_lines(task))
  curves = {name: metrics.curves(info.type, targets["held_out"], by_split["held_out"])
            for name, by_split in scores.items()} if "held_out" in splits else None
  report_lib.write_report(out_dir, report, curves_by_method=curves)
  return report


def few_shot_report(info, train_y, test_targets, features: dict[str, tuple], options: EvaluationOptions) -> dict:
  """The few-shot sweep of every method in `features` ({name: (train_x, test_x, model)})."""
  metric = metrics.primary_metric(info.type)

  def method(train_x, test_x, model) -> Callable[[np.ndarray], np.ndarray]:
    return lambda rows: fit_predict_task(model, info, train_x[rows], train_y[rows], test_x, options.seed)

  def score(predictions) -> float:
    return metrics.task_metrics(info.type, test_targets, predictions)[metric]
  sweep = classical.few_shot_sweep({name: method(*args) for name, args in features.items()}, train_y, score,
                                   ks=options.few_shot_ks, seeds=options.few_shot_seeds)
  return {"metric": metric, **sweep}


def dropped_rows_lines(task: dict) -> list[str]:
  """What the evaluation could not score: label rows dropped, per reason and split."""
  dropped = task.get("rows_dropped") or {}
  if not dropped.get("total"):
    return []
  per_split = ", ".join(f"{split} {n}" for split, n in dropped["no_history"].items() if n)
  return [f"{dropped['total']} label rows were dropped: {dropped['unknown_subject']} of unknown subjects, "
          f"{sum(dropped['no_history'].values())} without an event before the cut ({per_split or 'none'})"]


def pretraining_lines(report: dict, main_method: str) -> list[str]:
  """How the pre-trained model compares with the same architecture trained from scratch."""
  held_out = report["splits"].get("held_out")
  scratch = report["baselines"].get(SCRATCH, {}).get("held_out")
  if not held_out or not scratch:
    return []
  metric = metrics.primary_metric(report["task"]["type"])
  ours, theirs = held_out["metrics"].get(metric), scratch["metrics"].get(metric)
  if ours is None or theirs is None or np.isnan(ours) or np.isnan(theirs):
    why = held_out.get("undefined", {}).get(metric, "not defined on these labels")
    return [f"pre-training vs the same architecture from scratch: not compared, held_out {metric} is n/a ({why})"]
  lines = [f"pre-training vs the same architecture from scratch (same labels): {main_method} held_out {metric} "
           f"{ours:.3f} vs {theirs:.3f} ({ours - theirs:+.3f})"]
  probe = report["baselines"].get(PROBE, {}).get("held_out")
  if probe and probe["metrics"].get(metric) is not None:
    value = probe["metrics"].get(metric)
    lines.append(f"linear probe on the pre-trained embeddings: held_out {metric} {value:.3f} "
                 f"({value - theirs:+.3f} vs from scratch)")
  return lines
