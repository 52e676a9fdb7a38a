"""Writes subject embeddings of a pre-trained model to parquet, for stratification and analysis.

  python experiments/embed.py --pretrained=runs/ehr_bert --out=runs/ehr_bert/embeddings.parquet \
      [--labels=labels.parquet --config=configs/finetune.py:high_risk] [--splits=train,tuning,held_out]

Without `--labels`, each subject's whole record is embedded once. With `--labels`, each
label row is embedded from the history before its prediction time (as fine-tuning and
evaluation see it). The file has subject_id, prediction_time, split and embedding
columns; `experiments/stratify.py` clusters it.
"""
from __future__ import annotations

import pathlib

from absl import flags

from biofm_jax import cli

from biofm_jax.config import load_config

FLAGS = flags.FLAGS
flags.DEFINE_string("pretrained", None, "The pre-training run's workdir.")
flags.DEFINE_string("out", None, "The parquet file to write.")
flags.DEFINE_string("labels", "", "A MEDS labels file: embed each label row's history ('' = whole records).")
flags.DEFINE_string("config", "configs/finetune.py:high_risk", "Task config, used with --labels.")
flags.DEFINE_list("splits", ["train", "tuning", "held_out"], "Splits to embed.")
flags.mark_flags_as_required(["pretrained", "out"])


def whole_record_embeddings(pretrained: pathlib.Path, splits):
  from biofm_jax.train.embed import embed_split
  from biofm_jax.train.runs import open_run
  config, data, setup, params, _ = open_run(pretrained)
  if data.name != "ehr":  # stratify.py joins on integer MEDS subject ids
    raise ValueError(f"whole-record embeddings are written for EHR runs; {pretrained} is a {data.name!r} run "
                     f"(use biofm_jax.train.embed.embed_split from Python)")
  for split in splits:
    source = data.source(split)
    yield split, source.subject_ids, None, embed_split(setup, params, data, split, batch_size=config.data.batch_size)


def label_row_embeddings(pretrained: pathlib.Path, labels: str, overrides, splits, workdir: pathlib.Path):
  from biofm_jax.eval.downstream import frozen_embeddings
  from biofm_jax.train.finetune import finetune_config, open_labeled_data
  config = finetune_config(load_config(FLAGS.config, {**overrides, "task.labels": labels}), pretrained)
  data = open_labeled_data(config, workdir)
  embeddings = frozen_embeddings(config, data, splits)
  for split in splits:
    rows = data.split_labels(split)
    yield split, rows.subject_ids, rows.prediction_times, embeddings[split]


def main(argv, overrides):
  del argv
  import numpy as np

  from biofm_jax.train.embed import write_embeddings
  pretrained, out = pathlib.Path(FLAGS.pretrained).absolute(), pathlib.Path(FLAGS.out)
  try:
    parts = list(label_row_embeddings(pretrained, FLAGS.labels, overrides, FLAGS.splits, out.parent / "artifacts")
                 if FLAGS.labels else whole_record_embeddings(pretrained, FLAGS.splits))
    ids = np.concatenate([p[1] for p in parts])
    times = np.concatenate([p[2] if p[2] is not None else np.full(len(p[1]), np.datetime64("NaT"), "datetime64[us]")
                            for p in parts])
    splits = [p[0] for p in parts for _ in range(len(p[1]))]
    write_embeddings(out, ids, times, splits, np.concatenate([p[3] for p in parts]))
  except (KeyError, ValueError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  print(f"wrote {len(ids)} embeddings of dimension {parts[0][3].shape[1]} to {out}")


if __name__ == "__main__":
  cli.run(main)
