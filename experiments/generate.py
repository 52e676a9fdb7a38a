"""Simulates future timelines from a next-event model, from each label row's history.

  python experiments/generate.py --pretrained=runs/ehr_gpt --labels=labels.parquet \
      --samples=20 --horizon_days=365 --out=runs/ehr_gpt/simulated.parquet [--meds=DIR]

Each label row's prompt is its subject's record up to and including its prediction time
(`--strict` for strictly before), tokenised as training presents a window; the model
samples `--samples` futures of at most `--max_new` events from the prediction time on (the
time from the last event to it passed with no event, so the first event comes after it),
each stopping at the horizon or at a stop code (`--stop_codes`: exact codes or prefixes
ending in '*'; one the vocabulary lacks is an error; the default MEDS_DEATH is skipped with
a warning when absent). The parquet file has one row per simulated event: subject_id,
prediction_time, sample, step, code, days (after the prediction time, in (0, horizon]) and
time (the prediction time plus days). Only next-event models (configs/ehr_gpt.py) generate.
"""
from __future__ import annotations

import logging
import pathlib

from absl import flags

from biofm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("pretrained", None, "The next-event pre-training run's workdir.")
flags.DEFINE_string("labels", None, "A MEDS labels file (or ACES task folder): the rows to simulate from.")
flags.DEFINE_string("meds", "", "The MEDS dataset ('' = the one the run trained on).")
flags.DEFINE_string("out", None, "The parquet file to write.")
flags.DEFINE_integer("samples", 10, "Simulated futures per label row.")
flags.DEFINE_float("horizon_days", 365.0, "Days of future to simulate.")
flags.DEFINE_integer("max_new", 0, "Events per future at most (0 = half the model's max_len).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest codes (0 = all).")
flags.DEFINE_list("stop_codes", ["MEDS_DEATH"], "Codes that end a timeline (exact, or prefixes ending in '*').")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same futures.")
flags.DEFINE_bool("strict", False, "Prompts hold the events strictly before the prediction time.")
flags.mark_flags_as_required(["pretrained", "labels", "out"])
log = logging.getLogger("biofm_jax")


def stop_token_ids(vocab, codes, given: bool) -> tuple[int, ...]:
  """Token ids of the stop codes: every one given on the command line must be in the
  vocabulary; the default (MEDS_DEATH) is skipped when absent (no death was trained on)."""
  from biofm_jax.eval import zero_shot
  known = codes if given else [c for c in codes if c in set(vocab.codes)]
  if not given and len(known) < len(codes):
    log.warning("generate: the default stop code(s) %s are not in the model's vocabulary; timelines end only at "
                "the horizon or --max_new", sorted(set(codes) - set(known)))
  return tuple(int(i) for i in zero_shot.resolve_codes(vocab, known, what="--stop_codes")[1]) if known else ()


def simulate_label_rows(pretrained: pathlib.Path, labels_path: str, meds: str):
  """(labels, kept rows, simulated futures, the pre-training data module)."""
  import ml_collections

  from biofm_jax.data.labels import read_labels
  from biofm_jax.eval import zero_shot
  from biofm_jax.generate import GenerationSettings
  from biofm_jax.modalities import registry
  from biofm_jax.train.runs import open_run
  config, data, setup, params, _ = open_run(pretrained)
  if data.name != "ehr":
    raise ValueError(f"{pretrained} is a {data.name!r} run; only EHR next-event runs generate")
  if meds:
    cfg = ml_collections.ConfigDict(config.data.ehr.to_dict())
    cfg.path = meds
    data = registry.open_data_module("ehr", cfg, objective=config.objective.name,
                                     artifacts_dir=pretrained / "artifacts")
  stop_ids = stop_token_ids(data.vocab, FLAGS.stop_codes, FLAGS["stop_codes"].present)
  settings = GenerationSettings(max_new=FLAGS.max_new or data.max_len // 2, horizon_days=FLAGS.horizon_days,
                                temperature=FLAGS.temperature, top_k=FLAGS.top_k, stop_ids=stop_ids)
  labels = read_labels(labels_path, {"type": "binary"}, with_targets=False)
  rows, records = zero_shot.label_histories(data.dataset, labels.subject_ids, labels.prediction_times,
                                            inclusive=not FLAGS.strict)
  simulated = zero_shot.simulate(setup.model, params, data, records, labels.prediction_times[rows],
                                 samples=FLAGS.samples, settings=settings,
                                 gap_edges=config.objective.get("gap_edges_days", ()), seed=FLAGS.seed)
  return labels, rows, simulated, data


def main(argv, overrides):
  del argv, overrides
  import numpy as np
  import pyarrow as pa
  import pyarrow.parquet as pq

  from biofm_jax.data import batch as B
  pretrained, out = pathlib.Path(FLAGS.pretrained).absolute(), pathlib.Path(FLAGS.out)
  try:
    labels, rows, simulated, data = simulate_label_rows(pretrained, FLAGS.labels, FLAGS.meds)
  except cli.INPUT_ERRORS as e:
    cli.fail(f"{e}")
  futures, steps = np.nonzero(simulated["generated"])
  label_row = rows[simulated["row"][futures]]
  days = simulated["days"][futures, steps]  # after the prediction time (generate.py)
  times = labels.prediction_times[label_row] + np.round(days.astype(np.float64) * 86_400e6).astype("timedelta64[us]")
  codes = np.asarray(data.vocab.codes, dtype=object)[simulated["codes"][futures, steps] - B.NUM_SPECIAL]
  out.parent.mkdir(parents=True, exist_ok=True)
  pq.write_table(pa.table({
      "subject_id": pa.array(labels.subject_ids[label_row], pa.int64()),
      "prediction_time": pa.array(labels.prediction_times[label_row], pa.timestamp("us")),
      "sample": pa.array(simulated["sample"][futures], pa.int32()), "step": pa.array(steps, pa.int32()),
      "code": pa.array(codes.tolist(), pa.string()), "days": pa.array(days, pa.float32()),
      "time": pa.array(times, pa.timestamp("us"))}), out)
  print(f"simulated {FLAGS.samples} futures for each of {len(rows)} label rows ({len(labels) - len(rows)} without "
        f"a usable history) in {float(simulated['seconds']):.1f} s: {len(futures)} events written to {out}")


if __name__ == "__main__":
  cli.run(main)
