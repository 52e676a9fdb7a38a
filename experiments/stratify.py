"""Stratifies patients: clusters their embeddings and tests how clusters relate to outcomes and covariates.

  python experiments/stratify.py --embeddings=runs/ehr/embeddings.parquet --labels=labels.parquet \
      --out=runs/ehr/stratification --outcomes=boolean_value --covariates=sex,age_band --survival=time,event

`--embeddings` is a file written by experiments/embed.py; `--labels` a parquet file with
`subject_id` (and optionally `prediction_time`) plus the outcome and covariate columns.
Without `--num_clusters` the number of clusters is the k in 2..8 with the best silhouette.
Writes stratification.json, stratification.md, clusters.parquet (each row's cluster) and
plots to `--out`; see biofm_jax.eval.stratify.
"""
from __future__ import annotations

import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("embeddings", None, "Parquet file of embeddings (subject_id, prediction_time, split, embedding).")
flags.DEFINE_string("labels", None, "Parquet file of outcomes and covariates keyed by subject_id "
                    "(and prediction_time).")
flags.DEFINE_string("out", None, "Directory for the report (created if missing).")
flags.DEFINE_integer("num_clusters", None, "Number of clusters; by default the k in 2..8 with the best silhouette.")
flags.DEFINE_list("outcomes", [], "Outcome columns: binary ones get rates, numeric ones means.")
flags.DEFINE_list("covariates", [], "Covariate columns: categorical ones get proportions, numeric ones mean/std.")
flags.DEFINE_list("survival", [], "Survival time and event columns, e.g. time,event.")
flags.DEFINE_string("reference", None, "A categorical column to compare clusters with (adjusted Rand index).")
flags.DEFINE_string("split", None, "Only the embedding rows of this split (default: all rows).")
flags.DEFINE_integer("seed", 0, "Seed for PCA, KMeans and the silhouette sample.")
flags.mark_flags_as_required(["embeddings", "labels", "out"])

EXIT_BAD_INPUT = 2


def main(argv):
  del argv
  from biofm_jax.eval import stratify as lib
  if FLAGS.survival and len(FLAGS.survival) != 2:
    fail(f"--survival takes two columns, time and event, not {','.join(FLAGS.survival)!r}")
  try:
    keys, embeddings = lib.read_embeddings(FLAGS.embeddings)
    keys, embeddings = lib.select_split(keys, embeddings, FLAGS.split, source=FLAGS.embeddings)
    table = lib.join_on_subject(keys, lib.read_outcome_table(FLAGS.labels), table_name=FLAGS.labels)
    lib.require_columns(table, [*FLAGS.outcomes, *FLAGS.covariates, *FLAGS.survival,
                                *([FLAGS.reference] if FLAGS.reference else [])], FLAGS.labels)
    result = lib.stratify(keys, embeddings, table, num_clusters=FLAGS.num_clusters, seed=FLAGS.seed,
                          outcomes=FLAGS.outcomes, covariates=FLAGS.covariates, survival=FLAGS.survival or None,
                          reference=FLAGS.reference)
  except (ValueError, FileNotFoundError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
    fail(str(e))
  print_summary(result)
  out = lib.write_stratification(FLAGS.out, result)
  print("wrote:")
  for name in lib.OUTPUT_FILES:
    if (out / name).exists():
      print(f"  {out / name}")


def fail(message: str) -> None:
  # Bad input is the user's to fix: one line naming what is wrong, no traceback.
  print(f"error: {message}", file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def print_summary(result: dict) -> None:
  clustering = result["clustering"]
  print(f"{result['num_rows']} embedding rows{f' of split {FLAGS.split}' if FLAGS.split else ''}; "
        f"{result['num_unmatched']} without a match in {FLAGS.labels}")
  scores = "  ".join(f"k={k}: {s:.3f}" for k, s in clustering["silhouette"].items())
  print(f"k = {clustering['k']} ({'given' if clustering['chosen_by'] == 'given' else 'best silhouette'}; {scores})")
  print("cluster sizes: " + ", ".join(f"{c}: {n}" for c, n in result["sizes"].items()))
  tests = [(role, name, d["test"], d["p_value"]) for role in ("outcomes", "covariates")
           for name, d in result[role].items()]
  if result.get("survival"):
    s = result["survival"]
    tests.append(("survival", f"{s['time']}/{s['event']}", s["test"], s["p_value"]))
  if tests:
    print("association with clusters:")
    width = max(len(name) for _, name, _, _ in tests)
    for role, name, test, p_value in tests:
      print(f"  {role[:-1] if role.endswith('s') else role:<9} {name:<{width}}  {test:<14} p = {p_value:.3g}")
  if result.get("reference"):
    r = result["reference"]
    print(f"adjusted Rand index vs {r['column']}: {r['adjusted_rand']:.3f}")


if __name__ == "__main__":
  app.run(main)
