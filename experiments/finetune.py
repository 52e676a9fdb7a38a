"""Fine-tunes a pre-trained model on a labelled task, then scores it on every split.

  python experiments/finetune.py --config=configs/finetune.py:high_risk --pretrained=runs/ehr_bert \
      --workdir=runs/ft_high_risk [--config.finetune.mode=lora] [--config.task.labels=labels.parquet]

The backbone comes from the latest checkpoint of `--pretrained` (a partial restore into a
model with a new head); `--config.finetune.init=scratch` trains the same architecture
from random initialisation instead, the baseline pre-training must beat. Running the same
command again resumes. The held-out metrics are printed and written to
`<workdir>/finetune_metrics.json`, and each split's per-row predictions to
`<workdir>/predictions/finetuned/<split>.parquet` in meds-evaluation's schema (an existing
folder is replaced only with `--overwrite`); `experiments/evaluate.py --finetuned=<workdir>`
writes the full validation report. `--config.task.labels` takes a MEDS labels file or an
ACES output folder as written; rows without usable history are dropped and counted unless
`--strict_labels`.
"""
from __future__ import annotations

import json
import pathlib

from absl import flags

from biofm_jax import cli
from biofm_jax.config import load_config

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Fine-tuning config and task preset, e.g. configs/finetune.py:high_risk.")
flags.DEFINE_string("pretrained", None, "The pre-training run's workdir.")
flags.DEFINE_string("workdir", None, "Directory for the fine-tuning run.")
cli.define_distributed_flags()
flags.DEFINE_bool("strict_labels", False, "Label rows of unknown subjects or without history are an error, "
                  "not dropped and counted.")
flags.DEFINE_string("task_name", "", "The task's name in reports ('' = the labels' name).")
flags.DEFINE_bool("overwrite", False, "Replace an existing <workdir>/predictions folder.")
flags.mark_flags_as_required(["config", "pretrained", "workdir"])


def main(argv, overrides):
  del argv
  cli.initialize_distributed()
  from biofm_jax.eval import metrics, prediction_files
  from biofm_jax.eval.finetuned import predict_finetuned
  from biofm_jax.train.finetune import finetune, finetune_config
  overrides = dict(overrides)
  if FLAGS.strict_labels:
    overrides["task.strict_labels"] = True
  if FLAGS.task_name:
    overrides["task.name"] = FLAGS.task_name
  try:
    config = finetune_config(load_config(FLAGS.config, overrides), FLAGS.pretrained)
    prediction_files.check_writable(FLAGS.workdir, FLAGS.overwrite)
  except (KeyError, ValueError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  try:
    summary = finetune(config, FLAGS.workdir)
  except ValueError as e:  # bad labels or a checkpoint that does not fit: one clear line
    cli.fail(f"{e}")
  import jax
  if jax.process_count() > 1:  # scoring embeds in one process
    print(f"trained {summary['steps']} steps; score it with experiments/evaluate.py --finetuned={FLAGS.workdir} "
          f"in one process")
    return
  data, by_split = predict_finetuned(FLAGS.workdir, config)
  targets = {split: data.split_labels(split).metric_targets() for split in by_split}
  scores = {split: metrics.task_metrics(data.info.type, targets[split], values) for split, values in by_split.items()}
  tables = {split: prediction_files.prediction_table(data.info.type,
                                                    prediction_files.label_row_ids(data.split_labels(split)),
                                                    targets[split], values, data.info.classes)
            for split, values in by_split.items()}
  written = prediction_files.write_predictions(FLAGS.workdir, {"finetuned": tables}, overwrite=FLAGS.overwrite)
  path = pathlib.Path(FLAGS.workdir) / "finetune_metrics.json"
  path.write_text(json.dumps(scores, indent=2))
  print(f"\n=== fine-tuning ({config.task.name}, {config.task.type}, mode {config.finetune.mode}, "
        f"init {config.finetune.init}) ===")
  print(f"  steps {summary['steps']}, final train loss {summary.get('train/loss', float('nan')):.4f}")
  for split, values in scores.items():
    print(f"  {split:<9} " + ", ".join(f"{k} {v:.3f}" for k, v in values.items() if isinstance(v, float)))
  print(f"  written to {path} and {written}/finetuned/")


if __name__ == "__main__":
  cli.run(main)
