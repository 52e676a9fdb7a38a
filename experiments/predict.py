"""Scores raw records with an exported fine-tuned model and writes predictions.

  python experiments/predict.py --exported=exports/high_risk --meds=/data/new_meds \
      --labels=rows.parquet --out=predictions.parquet [--overwrite] [--strict_labels]
  python experiments/predict.py --exported=exports/lesion --records=/data/new_scans \
      --out=predictions.parquet
  python experiments/predict.py --exported=exports/fused_outcome \
      --records=ehr=/data/meds,imaging=/data/scans.csv,tabular=/data/features.csv \
      [--labels=subjects.parquet] --out=predictions.parquet

A fused model (fine-tuned from a multimodal run on a subject-keyed labels table) scores
subjects: `--records` names each modality's raw records as `modality=path` pairs (what each
`data.<modality>.path` takes). Every modality's records are read and preprocessed by its own
data module with the export's data config and artifacts and joined by subject
(`eval/predict_subjects.py`); a subject lacking a modality, or a modality not given at all,
is scored from what it has. One row per subject, keyed by `subject_id`, with the modalities
it brought (`modalities`); `--labels` (optional: `subject_id`, a `prediction_time` when the
model was fine-tuned with one, and the outcome when known) limits the rows to its rows and
writes the outcome beside the prediction; a row with a time reads each subject's EHR only
up to it, as fine-tuning did.

A model fine-tuned on a record modality's label column (images, ECGs, cells, sequences,
table rows) scores `--records`: what that modality's `data.<modality>.path` takes (an image
folder or manifest, a WFDB folder or manifest, an .h5ad file, a FASTA file, a feature
table), read and preprocessed by the modality's own data module with the export's data
config and artifacts (`eval/predict_records.py`); one row per record, keyed by `record_key`.
When the records carry the task's label column, the rows are the records with a value and
the value is written beside the prediction. An EHR model scores MEDS label rows:

Only the export folder is needed (experiments/export.py of a fine-tuning run): its
vocabulary and value bins tokenise the records, its export.json gives the window rule, the
task and the prediction-time cut, and its serialised function computes the logits. No
training config or checkpoint is read. `--labels` holds the rows to score in
`meds.LabelSchema` (`subject_id`, `prediction_time`; an ACES output folder works as
written); when it also holds the outcome (`boolean_value`, ...) the predictions file carries
it, in meds-evaluation's schema, ready for `meds-evaluation-cli`. Rows of unknown subjects
or without history are dropped and counted (`--strict_labels`: an error); the count of rows
none of whose codes the model's vocabulary knows is printed.
"""
from __future__ import annotations

import pathlib

from absl import flags

from biofm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("exported", None, "The export folder (experiments/export.py of a fine-tuning run).")
flags.DEFINE_string("meds", None, "EHR: the MEDS dataset with the records to score.")
flags.DEFINE_string("labels", None, "EHR: the rows to score, a meds.LabelSchema parquet file or folder; a fused "
                    "model: the subjects to score (optional).")
flags.DEFINE_string("records", None, "A record modality: the records to score (as its data.<modality>.path); a "
                    "fused model: modality=path pairs, e.g. ehr=/data/meds,imaging=/data/scans.csv.")
flags.DEFINE_string("out", None, "The predictions parquet file to write.")
flags.DEFINE_bool("overwrite", False, "Replace --out if it exists.")
flags.DEFINE_bool("strict_labels", False, "Rows of unknown subjects or without history (records without a "
                  "label, where the records carry the label column) are an error.")
flags.DEFINE_integer("batch_size", 64, "Rows per call of the exported function.")
flags.mark_flags_as_required(["exported", "out"])


def main(argv, overrides):
  del argv
  if overrides:
    cli.fail(f"predict.py takes no --config overrides (the export fixes the model): {sorted(overrides)}")
  ehr_rows = bool(FLAGS.meds and FLAGS.labels)
  fused = bool(FLAGS.records) and _names_modalities(FLAGS.records)
  if (FLAGS.records and (FLAGS.meds or (FLAGS.labels and not fused))) or not (FLAGS.records or ehr_rows):
    cli.fail("pass --records (a model fine-tuned on a record modality; modality=path pairs and optionally --labels "
             "for a fused model) or both --meds and --labels (an EHR model)")
  if pathlib.Path(FLAGS.out).exists() and not FLAGS.overwrite:  # before any work
    cli.fail(f"{FLAGS.out} exists: pass --overwrite to replace it")
  if fused:
    return score_subjects()
  if FLAGS.records:
    return score_records()
  from biofm_jax.eval.predict_meds import score_meds
  from biofm_jax.eval.prediction_files import write_table
  try:
    scored = score_meds(FLAGS.exported, FLAGS.meds, FLAGS.labels, strict_labels=FLAGS.strict_labels,
                        batch_size=FLAGS.batch_size)
    path = write_table(FLAGS.out, scored.table, overwrite=FLAGS.overwrite)
  except (KeyError, ValueError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  print(f"scored {scored.scored} of {scored.rows} rows -> {path}")
  if scored.dropped_unknown_subject or scored.dropped_no_history:
    print(f"  dropped: {scored.dropped_unknown_subject} rows of subjects not in {FLAGS.meds}, "
          f"{scored.dropped_no_history} without an event at or before the prediction time")
  if scored.no_known_code:
    print(f"  warning: {scored.no_known_code} of {scored.scored} scored rows had no code known to the model's "
          f"vocabulary: their predictions rest on the model's prior alone")


def _names_modalities(records: str) -> bool:
  """Whether `--records` is modality=path pairs (a fused model) rather than one path."""
  from biofm_jax.modalities.registry import MODALITIES
  return records.partition("=")[0].strip() in MODALITIES


def score_subjects():
  from biofm_jax.eval.predict_subjects import parse_records, score_subjects as score
  from biofm_jax.eval.prediction_files import write_table
  try:
    scored = score(FLAGS.exported, parse_records(FLAGS.records), labels=FLAGS.labels,
                   strict_labels=FLAGS.strict_labels, batch_size=FLAGS.batch_size)
    path = write_table(FLAGS.out, scored.table, overwrite=FLAGS.overwrite)
  except (KeyError, ValueError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  print(f"scored {scored.scored} of {scored.subjects} subjects -> {path}")
  print("  by the modalities each brought: " + ", ".join(f"{p} {n}" for p, n in scored.by_pattern.items()))
  if scored.unknown_subjects or scored.nothing_before:
    print(f"  dropped: {scored.unknown_subjects} label rows of subjects no given record has, "
          f"{scored.nothing_before} with nothing to read before their prediction_time")


def score_records():
  from biofm_jax.eval.predict_records import score_records as score
  from biofm_jax.eval.prediction_files import write_table
  try:
    scored = score(FLAGS.exported, FLAGS.records, strict_labels=FLAGS.strict_labels, batch_size=FLAGS.batch_size)
    path = write_table(FLAGS.out, scored.table, overwrite=FLAGS.overwrite)
  except (KeyError, ValueError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  print(f"scored {scored.scored} of {scored.records} {scored.modality} records -> {path}")
  if scored.without_label:
    print(f"  dropped: {scored.without_label} records without a value of a training class in the label column")


if __name__ == "__main__":
  cli.run(main)
