"""Indexes a MEDS dataset into an event store, so training reads it out of core.

  python experiments/index_meds.py --meds=/data/meds --out=/data/meds_events --workers=8
  python experiments/pretrain.py --config=configs/ehr_bert.py:base --workdir=runs/ehr \
      --config.data.ehr.path=/data/meds --config.data.ehr.event_store=/data/meds_events

On a cluster, the same indexing runs as an Apache Beam pipeline (pip install -e '.[beam]'):

  python experiments/index_meds.py --meds=/shared/meds --out=/shared/meds_events --engine=beam \
      --beam_option=--runner=FlinkRunner --beam_option=--flink_master=HOST:8081 \
      --beam_option=--environment_type=PROCESS ...        (or DataflowRunner, SparkRunner)

(locally, `--engine=beam --workers=N` runs Beam's DirectRunner with N processes; a cluster's
workers must all mount the --meds and --out folders). Either way it
streams every data file by parquet batches, `--workers` files at once (one process each),
and writes each subject's events as raw columns plus a subject index, the training split's
code counts and a bounded sample of each code's values
(`biofm_jax/modalities/ehr/event_store.py`). A training process then holds only the
subject index, whatever the number of rows, and every host reads the records of its own
data shard. The store is renamed into place when complete; a MEDS file changed later is
refused when the store is opened.
"""
from __future__ import annotations

import pathlib
import time

from absl import flags

from biofm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("meds", None, "The MEDS dataset directory (with data/ and metadata/).")
flags.DEFINE_string("out", None, "Directory to write the event store into (must not hold one).")
flags.DEFINE_integer("workers", 1, "Data files indexed at once, each in its own process.")
flags.DEFINE_bool("drop_duplicates", True, "Drop rows identical to an earlier row of the subject (counted).")
flags.DEFINE_enum("engine", "processes", ["processes", "beam"],
                  "Who runs the workers: a local process pool, or an Apache Beam pipeline (pip install -e '.[beam]').")
flags.DEFINE_multi_string("beam_option", [], "An Apache Beam pipeline option, e.g. --beam_option=--runner=FlinkRunner "
                          "(default: the local DirectRunner with --workers processes).")
flags.mark_flags_as_required(["meds", "out"])


def out_folder_problem(out: pathlib.Path) -> str | None:
  """Why `out` cannot receive an event store, or None: the finished store is renamed onto it
  (`data/sources/atomic.py`), which only works onto nothing or an empty folder, so this is
  checked before any file is indexed."""
  if not out.exists() and not out.is_symlink():
    return None
  if not out.is_dir() or out.is_symlink():
    return f"--out={out}: exists and is {'a link' if out.is_symlink() else 'not a folder'}; name a new or empty folder"
  from biofm_jax.modalities.ehr.event_store import SOURCE_FILE
  if (out / SOURCE_FILE).exists():
    return f"--out={out}: an event store is there already; choose a new folder"
  if any(out.iterdir()):
    return f"--out={out}: the folder is not empty; name a new or empty folder for the event store"
  return None


def main(argv, overrides):
  del argv
  if overrides:
    cli.fail(f"index_meds takes no config overrides; got {list(overrides)}")
  if FLAGS.workers < 1:
    cli.fail(f"--workers={FLAGS.workers}: expected at least 1")
  problem = out_folder_problem(pathlib.Path(FLAGS.out))
  if problem:
    cli.fail(problem)
  from biofm_jax.modalities.ehr import event_indexing, event_store
  start = time.perf_counter()
  try:
    out = event_indexing.build_event_store(FLAGS.meds, FLAGS.out, workers=FLAGS.workers,
                                        drop_duplicates=FLAGS.drop_duplicates, engine=FLAGS.engine,
                                        beam_options=FLAGS.beam_option)
  except ImportError as e:
    cli.fail(f"--engine=beam needs Apache Beam: pip install -e '.[beam]' ({e})")
  except (ValueError, FileExistsError) as e:
    cli.fail(f"{e}")
  store = event_store.EventStore(out)
  print(f"=== indexed {FLAGS.meds} in {time.perf_counter() - start:.1f} s with {FLAGS.workers} worker(s) "
        f"({FLAGS.engine}): {out} ===")
  for key in ("files", "rows", "subjects", "codes", "duplicate_rows", "unsorted_files", "subjects_in_multiple_files"):
    print(f"  {key:<28}{store.stats[key]}")
  print(f"  splits                      { {k: len(v) for k, v in store.splits.items()} }")
  print(f"  train with                  --config.data.ehr.path={pathlib.Path(FLAGS.meds)} "
        f"--config.data.ehr.event_store={out}")


if __name__ == "__main__":
  cli.run(main)
