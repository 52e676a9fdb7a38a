"""Fine-tunes a pre-trained model on a labelled task, then scores it on every split.

  python experiments/finetune.py --config=configs/finetune.py:high_risk --pretrained=runs/ehr_bert \
      --workdir=runs/ft_high_risk [--config.finetune.mode=lora] [--config.task.labels=labels.parquet]

The backbone comes from the latest checkpoint of `--pretrained` (a partial restore into a
model with a new head); `--config.finetune.init=scratch` trains the same architecture
from random initialisation instead, the baseline pre-training must beat. Running the same
command again resumes. The held-out metrics are printed and written to
`<workdir>/finetune_metrics.json`; `experiments/evaluate.py --finetuned=<workdir>` writes
the full validation report.
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import flags

from biofm_jax import cli, parallel
from biofm_jax.config import load_config

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Fine-tuning config and task preset, e.g. configs/finetune.py:high_risk.")
flags.DEFINE_string("pretrained", None, "The pre-training run's workdir.")
flags.DEFINE_string("workdir", None, "Directory for the fine-tuning run.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", None, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.mark_flags_as_required(["config", "pretrained", "workdir"])


def main(argv, overrides):
  del argv
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  from biofm_jax.train.finetune import finetune_config, score_finetuned
  from biofm_jax.train.loop import train_and_evaluate
  try:
    config = finetune_config(load_config(FLAGS.config, overrides), FLAGS.pretrained)
  except (KeyError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  try:
    summary = train_and_evaluate(config, FLAGS.workdir)
  except ValueError as e:  # bad labels or a checkpoint that does not fit: one clear line
    sys.exit(f"error: {e}")
  import jax
  if jax.process_count() > 1:  # scoring embeds in one process
    print(f"trained {summary['steps']} steps; score it with experiments/evaluate.py --finetuned={FLAGS.workdir} "
          f"in one process")
    return
  scores = score_finetuned(FLAGS.workdir, config)
  path = pathlib.Path(FLAGS.workdir) / "finetune_metrics.json"
  path.write_text(json.dumps(scores, indent=2))
  print(f"\n=== fine-tuning ({config.task.name}, {config.task.type}, mode {config.finetune.mode}, "
        f"init {config.finetune.init}) ===")
  print(f"  steps {summary['steps']}, final train loss {summary.get('train/loss', float('nan')):.4f}")
  for split, metrics in scores.items():
    print(f"  {split:<9} " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float)))
  print(f"  written to {path}")


if __name__ == "__main__":
  cli.run(main)
