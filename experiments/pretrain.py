"""Pre-trains a biofm_jax model from a config file.

  python experiments/pretrain.py --config=configs/ehr_bert.py:tiny --workdir=runs/ehr \
      --config.data.ehr.path=/path/to/meds --config.train.num_steps=200

Running the same command again resumes from the workdir's last checkpoint. With
--config.train.init_from=<run folder> (another pre-training run, or public weights brought
in by experiments/import_weights.py) a new run starts from that run's parameters and
architecture: continued pre-training on the data this config names. For a
multi-process run, pass --coordinator_address, --num_processes and --process_id to
every process.
"""
from __future__ import annotations

import json
import sys

from absl import flags

from biofm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "Config file and preset, e.g. configs/ehr_bert.py:tiny. Override "
                    "fields with --config.section.field=value.")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and artifacts.")
cli.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv, overrides):
  del argv
  config = cli.load_config_or_exit(FLAGS.config, overrides)
  cli.initialize_distributed()
  from biofm_jax.train.loop import train_and_evaluate  # after distributed init: it touches devices
  from biofm_jax.train.runs import with_init_run_model
  summary = train_and_evaluate(with_init_run_model(config), FLAGS.workdir)
  print_summary(summary)
  if summary["stopped_early"]:  # SIGTERM: checkpointed, not finished
    sys.exit(cli.EXIT_STOPPED_BY_SIGTERM)


def print_summary(summary: dict) -> None:
  """The objective's readable lines (a reference loss beside the model's, retrieval against
  chance), then every figure."""
  print("\n=== run summary ===")
  for line in summary.get("summary_lines", ()):
    print(f"  {line}")
  figures = {k: v for k, v in summary.items() if k != "summary_lines"}
  width = max(map(len, figures))
  for key, value in figures.items():
    shown = f"{value:.4f}" if isinstance(value, float) else json.dumps(value) if isinstance(value, dict) else value
    print(f"  {key:<{width}}  {shown}")


if __name__ == "__main__":
  cli.run(main)
