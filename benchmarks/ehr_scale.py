"""EHR pre-training at scale: memory, start-up, padding, coverage and real tokens/s.

  python benchmarks/ehr_scale.py                 # 3M and 30M MEDS rows
  python benchmarks/ehr_scale.py --rows=3e6      # one size
  python benchmarks/ehr_scale.py --with_300m     # adds 300M rows (about 30 GB of disk, hours here)

For each size it writes a MEDS dataset by streaming (8 shards, heavy-tailed timelines:
log-normal lengths with a median of 250 events; never held in memory), then measures, each
in a fresh process:
  - indexing it into an event store with 1 and 2 worker processes (time, peak memory);
  - a short training run on today's path (in-memory reader, one window per subject, no
    packing) and on the scale path (event store, windows covering every event, packing),
    same model and batch: time to the first step, peak resident memory, padding fraction,
    event coverage and real (non-padding) tokens/s.
Then it prints the issue's targets against what it saw.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARDS = 8
MEDIAN_EVENTS, SIGMA = 250, 1.0
NUM_CODES = 2000
STEPS, LOG_EVERY = 12, 4


# ---------------------------------------------------------------- the data, streamed
def write_meds(root: pathlib.Path, rows: int, seed: int = 0) -> pathlib.Path:
  """A MEDS dataset of about `rows` rows, written a block of subjects at a time."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  if (root / ".complete").exists():
    return root
  rng = np.random.default_rng(seed)
  (root / "data").mkdir(parents=True, exist_ok=True)
  (root / "metadata").mkdir(exist_ok=True)
  mean_events = MEDIAN_EVENTS * np.exp(SIGMA ** 2 / 2)
  subjects = int(rows / (mean_events + 2))
  per_shard = -(-subjects // SHARDS)
  code_p = 1.0 / np.arange(1, NUM_CODES + 1) ** 1.1
  code_p /= code_p.sum()
  code_names = np.array([f"CODE//{i}" for i in range(NUM_CODES)], dtype=object)
  valued = rng.random(NUM_CODES) < 0.3
  schema = pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
                      ("numeric_value", pa.float32())])
  split_ids, split_names = [], []
  for shard in range(SHARDS):
    with pq.ParquetWriter(root / "data" / f"{shard}.parquet", schema) as writer:
      for first in range(shard * per_shard, min((shard + 1) * per_shard, subjects), 2000):
        ids = np.arange(first, min(first + 2000, (shard + 1) * per_shard, subjects))
        n = np.maximum(np.round(rng.lognormal(np.log(MEDIAN_EVENTS), SIGMA, len(ids))).astype(np.int64), 1)
        births = np.datetime64("1950-01-01", "us") + rng.integers(0, 50 * 365, len(ids)).astype("timedelta64[D]")
        subject = np.repeat(ids, n + 2)
        starts = np.concatenate([[0], np.cumsum(n + 2)[:-1]])
        within = np.arange(len(subject)) - np.repeat(starts, n + 2)
        gaps = rng.exponential(5.0, len(subject)).astype("timedelta64[D]")
        offset = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[starts], n + 2)
        times = np.repeat(births, n + 2) + np.timedelta64(18 * 365, "D") + offset.astype("timedelta64[D]")
        code_index = rng.choice(NUM_CODES, len(subject), p=code_p)
        codes = code_names[code_index]
        values = np.where(valued[code_index], rng.lognormal(0, 1, len(subject)), np.nan)
        static, birth = within == 0, within == 1  # a static row, then the birth, then events
        codes[static], codes[birth] = "GENDER//F", "MEDS_BIRTH"
        times[birth] = births
        values[static | birth] = np.nan
        times = np.where(static, np.datetime64("NaT"), times)
        writer.write_table(pa.table({
            "subject_id": pa.array(subject, pa.int64()), "time": pa.array(times, pa.timestamp("us")),
            "code": pa.array(codes.tolist(), pa.string()),
            "numeric_value": pa.array(values.astype(np.float32), pa.float32(), from_pandas=True)}, schema=schema))
        split_ids.append(ids)
        split_names.append(np.where(ids % 10 < 8, "train", np.where(ids % 10 == 8, "tuning", "held_out")))
  pq.write_table(pa.table({"subject_id": np.concatenate(split_ids), "split": np.concatenate(split_names).tolist()}),
                 root / "metadata" / "subject_splits.parquet")
  (root / ".complete").touch()
  return root


# ---------------------------------------------------------------- measured in a fresh process
def _peak_gb() -> float:
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return max(own, children) / 2**20  # KiB -> GiB


def role_index(meds: str, out: str, workers: int) -> dict:
  from biofm_jax.modalities.ehr import event_indexing
  start = time.perf_counter()
  event_indexing.build_event_store(meds, out, workers=workers)
  return {"seconds": time.perf_counter() - start, "peak_gb": _peak_gb()}


def role_train(meds: str, store: str, workdir: str, scale_path: bool) -> dict:
  from biofm_jax.config import load_config
  from biofm_jax.train.loop import train_and_evaluate
  from biofm_jax.train.metric_writer import read_metrics
  overrides = {"data.ehr.path": meds, "data.ehr.max_len": "512", "data.batch_size": "8",
               "data.ehr.min_code_count": "10",
               "data.ehr.event_store": store if scale_path else "",
               "data.ehr.train_windows": "cover" if scale_path else "one",
               "data.ehr.pack": str(scale_path), "train.num_steps": str(STEPS), "train.log_every": str(LOG_EVERY),
               "train.eval_every": str(10 * STEPS), "train.eval_batches": "1", "checkpoint.every_steps": str(10 * STEPS)}
  config = load_config(str(REPO / "configs" / "ehr_bert.py") + ":demo", overrides)
  train_and_evaluate(config, workdir)
  rows = [r for r in read_metrics(workdir) if "train/loss" in r]
  return {"peak_gb": _peak_gb(), "time_to_first_step_s": rows[0]["perf/time_to_first_step_s"],
          "real_tokens_per_s": float(np.mean([r["perf/real_tokens_per_s"] for r in rows[1:]])),
          "padding_fraction": float(np.mean([r["train/padding_fraction"] for r in rows])),
          "event_coverage": rows[0]["data/train_event_coverage"]}


def measure(role: str, **kwargs) -> dict:
  """Runs `role` in a fresh Python process; its figures come back as JSON."""
  command = [sys.executable, __file__, f"--role={role}", f"--role_args={json.dumps(kwargs)}"]
  result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if result.returncode:
    raise RuntimeError(f"{role} failed:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the report
def run_size(rows: int, scratch: pathlib.Path) -> dict:
  meds = scratch / f"meds_{rows}"
  start = time.perf_counter()
  write_meds(meds, rows)
  print(f"[{rows:,} rows] MEDS written in {time.perf_counter() - start:.0f} s", flush=True)
  out = {"rows": rows}
  for workers in (1, 2):
    store = scratch / f"store_{rows}_{workers}"
    if store.exists():
      import shutil
      shutil.rmtree(store)
    out[f"index_{workers}"] = measure("index", meds=str(meds), out=str(store), workers=workers)
    print(f"[{rows:,} rows] index with {workers} worker(s): {out[f'index_{workers}']}", flush=True)
  for name, scale_path in (("today", False), ("scale", True)):
    workdir = scratch / f"run_{rows}_{name}"
    if workdir.exists():
      import shutil
      shutil.rmtree(workdir)
    out[name] = measure("train", meds=str(meds), store=str(scratch / f"store_{rows}_2"), workdir=str(workdir),
                        scale_path=scale_path)
    print(f"[{rows:,} rows] train, {name} path: {out[name]}", flush=True)
  return out


def report(results: list[dict]) -> None:
  print("\n| MEDS rows | index 1 worker (s, GB) | index 2 workers (s, GB) | path | peak RSS (GB) | "
        "first step (s) | padding | coverage | real tokens/s |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in results:
    for name in ("today", "scale"):
      t = r[name]
      print(f"| {r['rows']:,} | {r['index_1']['seconds']:.0f}, {r['index_1']['peak_gb']:.2f} | "
            f"{r['index_2']['seconds']:.0f}, {r['index_2']['peak_gb']:.2f} | {name} | {t['peak_gb']:.2f} | "
            f"{t['time_to_first_step_s']:.0f} | {t['padding_fraction']:.1%} | {t['event_coverage']:.1%} | "
            f"{t['real_tokens_per_s']:,.0f} |")
  small, large = results[0], results[-1]
  print("\nTargets:")
  print(f"  training RSS growth {small['rows']:,} -> {large['rows']:,} rows (scale path): "
        f"{large['scale']['peak_gb'] - small['scale']['peak_gb']:+.2f} GB (target <= +0.3)")
  print(f"  time to first step growth (scale path): "
        f"{large['scale']['time_to_first_step_s'] / small['scale']['time_to_first_step_s'] - 1:+.0%} (target <= +20%)")
  print(f"  padding (scale path): {max(r['scale']['padding_fraction'] for r in results):.1%} (target <= 5%); "
        f"coverage {min(r['scale']['event_coverage'] for r in results):.1%} (target 100%)")
  print(f"  real tokens/s, scale / today at {large['rows']:,} rows: "
        f"{large['scale']['real_tokens_per_s'] / large['today']['real_tokens_per_s']:.2f}x (target >= 1.8x)")
  speedups = ", ".join(f"{r['index_1']['seconds'] / r['index_2']['seconds']:.2f}x" for r in results)
  print(f"  indexing speed-up with 2 workers: {speedups} (target >= 1.7x)")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--rows", type=float, action="append", help="MEDS rows (repeatable); default 3e6 and 3e7")
  parser.add_argument("--with_300m", action="store_true", help="also 3e8 rows")
  parser.add_argument("--scratch", default="", help="where the data goes (default: a temporary folder)")
  parser.add_argument("--role", default="", help=argparse.SUPPRESS)
  parser.add_argument("--role_args", default="{}", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.role:
    print(json.dumps({"index": role_index, "train": role_train}[args.role](**json.loads(args.role_args))))
    return
  sizes = [int(r) for r in (args.rows or [3e6, 3e7])] + ([int(3e8)] if args.with_300m else [])
  scratch = pathlib.Path(args.scratch or tempfile.mkdtemp(prefix="ehr_scale_"))
  print(f"scratch folder: {scratch}")
  report([run_size(rows, scratch) for rows in sizes])


if __name__ == "__main__":
  main()
