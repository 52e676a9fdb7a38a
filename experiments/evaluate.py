"""Validates a pre-trained model on a labelled task and writes the report.

  python experiments/evaluate.py --pretrained=runs/ehr_bert --labels=labels.parquet --workdir=runs/eval \
      [--config=configs/finetune.py:high_risk] [--task_type=binary] [--finetuned=runs/ft] \
      [--from_scratch_steps=300] [--subgroups=sex,age_band,site] [--strict_labels] [--task_name=NAME]

By default the model is scored by a linear probe on its frozen embeddings; `--finetuned`
scores a fine-tuning run instead (the probe is then listed beside it). Every report also
holds the count-of-codes baselines (logistic regression and gradient boosting), the same
architecture trained from scratch on the same labels when `--from_scratch_steps` > 0, and
a few-shot sweep. Written to `--workdir`: report.json (`held_out.auroc` etc.), report.md,
report.html, the plots, and every model's per-row predictions as
`predictions/<model>/<split>.parquet` in meds-evaluation's schema (`--overwrite` to replace
them). `--labels` takes a MEDS labels file or an ACES output folder as written; rows of
unknown subjects or without an event at or before their prediction time are dropped and
counted (`report.json`'s task.rows_dropped) unless `--strict_labels`. Subgroups come from
labels columns, or from codes (`--subgroup_codes`, default sex from GENDER// or SEX//, race
from RACE//, ethnicity from ETHNICITY//), plus the age band. `--config` supplies the task section (type, columns, time
bins) and the fine-tuning settings used for the from-scratch baseline.

`--zero_shot_code=CODE` (several allowed, prefixes like `ICD10CM//N18*`) adds zero-shot
prediction by a next-event model: per label row, the share of `--zero_shot_samples`
simulated futures that hold the code within `--zero_shot_horizon_days` (report.json:
`<split>.zero_shot`, `baselines.zero_shot` with the samples and the seconds it took).
For a record model (images, ECGs, cells, sequences, tables), `--label_column` names one of
the run's label columns (e.g. `cell_type`): its linear probe is compared with the modality's
raw-feature baseline (L1 logistic regression on normalised counts for expression, logistic
regression on the raw features for tables, ...). With `--finetuned` (a run fine-tuned on that
column) or `--from_scratch_steps`, the report is the full one above: the fine-tuned model,
the probe, the raw-feature baseline and the architecture trained from scratch on the same
labels (pass the task preset: `--config=configs/finetune.py:binary`, or the --finetuned
run's own is used).

For a fused model of a multimodal run, `--labels` is a labels table keyed by `subject_id`:
the baseline is HAIM's (each modality's raw features concatenated with missingness
indicators, gradient boosting), and every metric is also given per availability pattern
(`modalities`: EHR only, EHR + imaging, ...).
"""
from __future__ import annotations


from absl import flags

from biofm_jax import cli

from biofm_jax.config import load_config

FLAGS = flags.FLAGS
flags.DEFINE_string("pretrained", None, "The pre-training run's workdir.")
flags.DEFINE_string("labels", "", "A MEDS labels parquet file ('' = the config's task.labels / task.synthetic).")
flags.DEFINE_string("workdir", None, "Directory for the report.")
flags.DEFINE_string("config", "", "The task config (configs/finetune.py:<task>); '' = the --finetuned run's own, "
                    "else configs/finetune.py:high_risk.")
flags.DEFINE_string("task_type", "", "binary, multiclass, multilabel, regression or survival ('' = the config's).")
flags.DEFINE_string("label_column", "", "Record runs (images, ECGs, cells, sequences, tables): the label column "
                    "to evaluate (e.g. cell_type).")
flags.DEFINE_string("finetuned", "", "A fine-tuning run's workdir to score instead of the linear probe.")
flags.DEFINE_integer("from_scratch_steps", 0, "Steps of the from-scratch baseline (0: leave it out).")
flags.DEFINE_list("subgroups", ["sex", "age_band", "race", "ethnicity"],
                  "Covariate columns to report metrics per value of.")
flags.DEFINE_list("subgroup_codes", ["sex=GENDER//|SEX//", "race=RACE//", "ethnicity=ETHNICITY//"],
                  "name=prefix|prefix: a subgroup read from the first code with one of the prefixes.")
flags.DEFINE_bool("strict_labels", False, "Label rows of unknown subjects or without history are an error, "
                  "not dropped and counted.")
flags.DEFINE_string("task_name", "", "The report's title ('' = the labels' name: ACES task folder or file stem).")
flags.DEFINE_bool("overwrite", False, "Replace an existing <workdir>/predictions folder.")
flags.DEFINE_list("few_shot_ks", ["1", "2", "4", "8", "16", "32", "64", "128"], "Labels per class in the sweep.")
flags.DEFINE_integer("few_shot_seeds", 3, "Seeds per k in the few-shot sweep.")
flags.DEFINE_integer("bootstrap_samples", 200, "Bootstrap resamples for the confidence intervals.")
flags.DEFINE_list("zero_shot_code", [], "Zero-shot by simulated futures (next-event runs, binary tasks): outcome "
                  "codes, exact or prefixes ending in * (e.g. ICD10CM//N18*).")
flags.DEFINE_float("zero_shot_horizon_days", 365.0, "Zero-shot: the outcome counts within this many days.")
flags.DEFINE_integer("zero_shot_samples", 20, "Zero-shot: simulated futures per label row.")
flags.DEFINE_integer("zero_shot_max_new", 0, "Zero-shot: events per future at most (0 = half the model's max_len).")
flags.mark_flags_as_required(["pretrained", "workdir"])


def task_config(overrides):
  """--config, or the fine-tuned run's saved config (so its scores are of the same task)."""
  if FLAGS.config or not FLAGS.finetuned:
    return load_config(FLAGS.config or "configs/finetune.py:high_risk", overrides)
  from biofm_jax.config import set_field
  from biofm_jax.train.finetune import saved_config
  config = saved_config(FLAGS.finetuned)
  for name, value in overrides.items():
    set_field(config, name, value)
  return config


def main(argv, overrides):
  del argv
  from biofm_jax.eval.downstream import EvaluationOptions, evaluate_task
  from biofm_jax.train.finetune import finetune_config
  overrides = dict(overrides)
  if FLAGS.labels:
    overrides["task.labels"] = FLAGS.labels
  if FLAGS.task_type:
    overrides["task.type"] = FLAGS.task_type
  if FLAGS.strict_labels:
    overrides["task.strict_labels"] = True
  if FLAGS.task_name:
    overrides["task.name"] = FLAGS.task_name
  elif FLAGS.labels:  # the title follows the labels given, not the config's preset
    overrides["task.name"] = ""
  try:
    ks = tuple(int(k) for k in FLAGS.few_shot_ks)
  except ValueError:
    cli.fail(f"--few_shot_ks must be integers, got {FLAGS.few_shot_ks}")
  if FLAGS.few_shot_seeds < 1:
    cli.fail(f"--few_shot_seeds must be at least 1, got {FLAGS.few_shot_seeds}")
  subgroup_codes = tuple((name, tuple(prefixes.split("|"))) for name, _, prefixes in
                         (item.partition("=") for item in FLAGS.subgroup_codes))
  if any(not name or not all(prefixes) for name, prefixes in subgroup_codes):
    cli.fail(f"--subgroup_codes takes name=PREFIX|PREFIX,..., got {FLAGS.subgroup_codes}")
  options = EvaluationOptions(subgroups=tuple(FLAGS.subgroups), subgroup_codes=subgroup_codes, few_shot_ks=ks,
                              overwrite=FLAGS.overwrite,
                              few_shot_seeds=tuple(range(FLAGS.few_shot_seeds)),
                              bootstrap_samples=FLAGS.bootstrap_samples, finetuned_workdir=FLAGS.finetuned or None,
                              from_scratch_steps=FLAGS.from_scratch_steps,
                              zero_shot_codes=tuple(FLAGS.zero_shot_code),
                              zero_shot_horizon_days=FLAGS.zero_shot_horizon_days,
                              zero_shot_samples=FLAGS.zero_shot_samples, zero_shot_max_new=FLAGS.zero_shot_max_new)
  try:
    if FLAGS.label_column and not (FLAGS.finetuned or FLAGS.from_scratch_steps):
      from biofm_jax.eval.record_tasks import evaluate_record_labels
      report = evaluate_record_labels(FLAGS.pretrained, FLAGS.workdir, FLAGS.label_column, options)
    else:
      if FLAGS.label_column:
        overrides["task.label_column"] = FLAGS.label_column
      config = finetune_config(task_config(overrides), FLAGS.pretrained)
      report = evaluate_task(config, FLAGS.workdir, options)
  except (KeyError, ValueError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  print(f"\n=== validation report: {report['task']['name']} ({report['task']['type']}) ===")
  for line in report["summary"]:
    print("  " + line)
  print(f"  written to {FLAGS.workdir}/report.json, report.md, report.html")


if __name__ == "__main__":
  cli.run(main)
