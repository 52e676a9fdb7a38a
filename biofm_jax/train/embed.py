"""Embeddings of a whole split from a trained model, for probes and downstream analysis.

Records are embedded in source order with the deterministic evaluation transforms and
no pre-training masking, so row i belongs to `data_module.source(split)[i]`.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np

from biofm_jax import parallel
from biofm_jax.data import pipeline
from biofm_jax.train import step as step_lib
import pathlib
import pyarrow as pa
import pyarrow.parquet as pq


def embed_split(setup, params, data_module, split: str, *, batch_size: int, seed: int = 0,
                output: str | tuple[str, ...] | None = None) -> np.ndarray:
  """[num_records, embed_dim] float32 embeddings of `split` (single process).

  `output` picks the embedding (see `step.output_path`); by default the data module's
  modality, and for a multimodal data module the fused embedding.
  """
  if output is None:
    modalities = list(data_module.model_info())
    output = modalities[0] if len(modalities) == 1 else ("fused", "embedding")
  return embed_split_outputs(setup, params, data_module, split, {"embedding": output}, batch_size=batch_size,
                             seed=seed)["embedding"]


def embed_split_outputs(setup, params, data_module, split: str, outputs: Mapping[str, Any], *,
                        batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """{name: [num_records, D]} for several `outputs` ({name: output}) in one pass over `split`."""
  if jax.process_count() > 1:
    raise NotImplementedError("embed_split runs in one process; gather per-process shards for more")
  source = data_module.source(split)
  dataset = pipeline.make_eval_dataset(source, data_module.transforms(train=False, mask=False),
                                       global_batch_size=batch_size, seed=seed,
                                       example_spec=data_module.embedding_spec())
  embed = step_lib.jit_embed_step(setup.model, dict(outputs), setup.state_shardings.params, setup.mesh,
                                  setup.rules)
  chunks = [jax.device_get(embed(params, parallel.make_global_batch(batch, setup.mesh)))
            for batch in pipeline.make_iterator(dataset)]
  # The eval pipeline appends padding examples after the last record: drop them.
  return {name: np.concatenate([np.asarray(c[name]) for c in chunks])[: len(source)].astype(np.float32)
          for name in outputs}


def write_embeddings(path, subject_ids, prediction_times, splits, embeddings: np.ndarray):
  """Writes the embeddings parquet file that `experiments/stratify.py` reads: subject_id,
  prediction_time (null when embeddings are of whole records), split, embedding
  (fixed-size list of float32). Written to a temporary name and renamed."""

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  embeddings = np.asarray(embeddings, np.float32)
  times = np.asarray(prediction_times).astype("datetime64[us]")
  table = pa.table({
      "subject_id": pa.array(np.asarray(subject_ids, np.int64)),
      "prediction_time": pa.array(times, pa.timestamp("us"), mask=np.isnat(times)),
      "split": pa.array(list(splits), pa.string()),
      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1]),
  })
  tmp = path.with_name(path.name + ".tmp")
  pq.write_table(table, tmp)
  tmp.replace(path)
  return path
