"""Expression pre-training from a TileDB-SOMA experiment: memory at atlas scale.

  python benchmarks/soma_scale.py                  # 1M cells x 2,000 genes
  python benchmarks/soma_scale.py --cells=2e5      # a quicker look

Writes a SOMA experiment chunk by chunk (never the whole matrix in memory; about 3% of
entries expressed, negative-binomial counts over four cell types), then in a fresh process
opens it the way training does (the validating scan, the gene vocabulary from 50,000
training cells, the block-buffered training stream) and reads training batches, reporting
time and peak resident memory next to the size of the matrix itself.
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

GENES, CHUNK = 2000, 50_000
BATCHES, BATCH_SIZE = 200, 64


def write_experiment(uri: pathlib.Path, cells: int, seed: int = 0) -> pathlib.Path:
  import anndata
  import pandas as pd
  import scipy.sparse as sp
  import tiledbsoma.io
  if (uri.parent / f"{uri.name}.complete").exists():
    return uri
  rng = np.random.default_rng(seed)
  means = rng.lognormal(-3.0, 1.5, GENES)
  markers = rng.choice(GENES, (4, 20), replace=False)
  var = pd.DataFrame(index=[f"GENE{j:05d}" for j in range(GENES)])
  for first in range(0, cells, CHUNK):
    n = min(CHUNK, cells - first)
    types = rng.integers(0, 4, n)
    parts = []
    for lo in range(0, n, 5000):  # dense sub-blocks of 5,000 cells: 40 MB at a time
      hi = min(lo + 5000, n)
      mu = np.tile(means, (hi - lo, 1))
      mu[np.arange(hi - lo)[:, None], markers[types[lo:hi]]] *= 30.0
      counts = rng.negative_binomial(2.0, 2.0 / (2.0 + mu)).astype(np.float32)
      parts.append(sp.csr_matrix(counts))
    split = np.where(rng.random(n) < 0.8, "train", np.where(rng.random(n) < 0.5, "tuning", "held_out"))
    obs = pd.DataFrame({"cell_type": pd.Categorical([f"type{t}" for t in types], categories=[f"type{t}" for t in range(4)]),
                        "split": pd.Categorical(split, categories=["train", "tuning", "held_out"])},
                       index=[f"cell{first + i:08d}" for i in range(n)])
    adata = anndata.AnnData(sp.vstack(parts).tocsr(), obs=obs, var=var)
    if first == 0:
      tiledbsoma.io.from_anndata(str(uri), adata, measurement_name="RNA")
    else:
      mapping = tiledbsoma.io.register_anndatas(str(uri), [adata], measurement_name="RNA",
                                                obs_field_name="obs_id", var_field_name="var_id")
      mapping.prepare_experiment(str(uri))
      tiledbsoma.io.from_anndata(str(uri), adata, measurement_name="RNA", registration_mapping=mapping)
    print(f"  written {first + n:,} cells", flush=True)
  (uri.parent / f"{uri.name}.complete").touch()
  return uri


def role_train(uri: str, workdir: str) -> dict:
  import ml_collections
  from biofm_jax.data import pipeline
  from biofm_jax.modalities.omics import data as omics
  cfg = ml_collections.ConfigDict(dict(
      path=uri, backed=False, layer="", gene_column="", label_columns=("cell_type",), tokenization="binned",
      max_len=64, num_value_bins=16, normalize_total=1e4, log1p=True, mask_rate=0.25, synthetic_cells=1,
      synthetic_seed=0))
  start = time.perf_counter()
  data = omics.OmicsData.from_config(cfg, targets="masked", artifacts_dir=workdir)
  opened = time.perf_counter() - start
  iterator = pipeline.make_iterator(data.make_train_dataset(global_batch_size=BATCH_SIZE, seed=0))
  start = time.perf_counter()
  for _ in range(BATCHES):
    next(iterator)
  cells_per_s = BATCHES * BATCH_SIZE / (time.perf_counter() - start)
  stats = data.dataset.stats
  return {"cells": stats["cells"], "nonzeros": stats["nonzeros"], "open_s": opened, "cells_per_s": cells_per_s,
          "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
          "blocks_read": data.dataset._reader.blocks_read}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--cells", type=float, default=1e6)
  parser.add_argument("--scratch", default="")
  parser.add_argument("--role_args", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.role_args:
    print(json.dumps(role_train(**json.loads(args.role_args))))
    return
  scratch = pathlib.Path(args.scratch or tempfile.mkdtemp(prefix="soma_scale_"))
  uri = scratch / f"experiment_{int(args.cells)}"
  start = time.perf_counter()
  write_experiment(uri, int(args.cells))
  print(f"experiment {uri} ready in {time.perf_counter() - start:.0f} s")
  workdir = scratch / "run"
  if workdir.exists():  # a fresh run: the vocabulary is built, not loaded
    import shutil
    shutil.rmtree(workdir)
  command = [sys.executable, __file__, f"--role_args={json.dumps({'uri': str(uri), 'workdir': str(workdir)})}"]
  result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  if result.returncode:
    raise SystemExit(result.stderr[-3000:])
  r = json.loads(result.stdout.strip().splitlines()[-1])
  matrix_gb = r["nonzeros"] * 12 / 2**30  # CSR: float32 value + int32 gene + (amortised) pointers
  print("\n| cells | expressed values | matrix in memory as CSR (GB) | open + vocabulary (s) | "
        "training cells/s (0 workers) | peak RSS (GB) |")
  print("| --- | --- | --- | --- | --- | --- |")
  print(f"| {r['cells']:,} | {r['nonzeros']:,} | {matrix_gb:.2f} | {r['open_s']:.0f} | {r['cells_per_s']:,.0f} | "
        f"{r['peak_gb']:.2f} |")


if __name__ == "__main__":
  main()
