"""Simulates future timelines from a next-event model, from each label row's history.

  python experiments/generate.py --pretrained=runs/ehr_gpt --labels=labels.parquet \
      --samples=20 --horizon_days=365 --out=runs/ehr_gpt/simulated.parquet [--meds=DIR]

Each label row's prompt is its subject's record up to and including its prediction time
(`--strict` for strictly before), as fine-tuning sees it; the model samples `--samples`
futures of at most `--max_new` events, each stopping at the horizon or at a stop code
(`--stop_codes`, MEDS_DEATH by default). The parquet file has one row per simulated event:
subject_id, prediction_time, sample, step, code, days (after the prediction time's
history ends) and time. Only next-event models (configs/ehr_gpt.py) generate.
"""
from __future__ import annotations

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
flags.DEFINE_list("stop_codes", ["MEDS_DEATH"], "Codes that end a timeline (those in the vocabulary).")
flags.DEFINE_integer("seed", 0, "Sampling seed: the same seed gives the same futures.")
flags.DEFINE_bool("strict", False, "Prompts hold the events strictly before the prediction time.")
flags.mark_flags_as_required(["pretrained", "labels", "out"])


def simulate_label_rows(pretrained: pathlib.Path, labels_path: str, meds: str):
  """(labels, kept rows, simulated futures, the pre-training data module)."""
  import ml_collections
  import numpy as np

  from biofm_jax.data.labels import read_labels
  from biofm_jax.eval import zero_shot
  from biofm_jax.generate import GenerationSettings
  from biofm_jax.modalities.ehr.data import EHRData, TokenizeEHR
  from biofm_jax.train.runs import open_run
  config, data, setup, params, _ = open_run(pretrained)
  if data.name != "ehr":
    raise ValueError(f"{pretrained} is a {data.name!r} run; only EHR next-event runs generate")
  if meds:
    cfg = ml_collections.ConfigDict(config.data.ehr.to_dict())
    cfg.path = meds
    data = EHRData.from_config(cfg, objective=config.objective.name, artifacts_dir=pretrained / "artifacts")
  labels = read_labels(labels_path, {"type": "binary"}, with_targets=False)
  rows, records = zero_shot.label_histories(data.dataset, labels.subject_ids, labels.prediction_times,
                                            inclusive=not FLAGS.strict)
  vocab = data.vocab
  known_stops = [c for c in FLAGS.stop_codes if c in set(vocab.codes)]
  stop_ids = tuple(int(i) for i in vocab.code_ids(np.asarray(known_stops, dtype=object)))
  settings = GenerationSettings(max_new=FLAGS.max_new or data.max_len // 2, horizon_days=FLAGS.horizon_days,
                                temperature=FLAGS.temperature, top_k=FLAGS.top_k, stop_ids=stop_ids)
  simulated = zero_shot.simulate(setup.model, params, TokenizeEHR(vocab, data.max_len), records,
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
  days = simulated["days"][futures, steps]
  times = labels.prediction_times[label_row] + (days * 86_400e6).astype("timedelta64[us]")
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
