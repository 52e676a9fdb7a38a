"""Exported models: a pre-trained encoder serialised with `jax.export`, run without the
config, the model code or the training code.

`export_embedding_model` writes a directory:

  model.jax_export   the serialised StableHLO of `(parameters, batch) -> embeddings`, with a
                     symbolic batch size, so any number of examples runs
  params.npz         the parameters, in the order the exported function takes them
  export.json        what the model takes and gives: the input fields (shape and dtype per
                     example, keyed by modality), the output, and the run it came from
  artifacts/         the vocabularies and preprocessing statistics the inputs were made with:
                     the files the caller names (`registry.model_artifact_files`), nothing
                     else of the run's artifacts (never an event store, a cohort or labels)

  loader.py          `export_loader.py`, copied: `load_exported(directory)` gives an
                     `ExportedModel` that needs only jax, numpy and flatbuffers, not the library

`model(batch) -> [B, D]` numpy outputs. Inputs are the tokenised / normalised batches the
data modules produce (see `data/batch.py`); the saved artifacts and export.json's `data`
section (the run's data config: tokeniser settings, windowing) say how they were made, so
`experiments/predict.py` can go from raw MEDS records to predictions with them alone.

`export_run(workdir, out)` exports a training run's latest checkpoint (what
`experiments/export.py` does): the run's data config, its objective's name, the artifact
files its registry rows name, and for a fine-tuned run its task (type, classes, label
statistics, a record column's values behind the class ids, the prediction-time cut), so
raw records of its modality are scored with the export alone (`eval/predict_records.py`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np

from biofm_jax import export_loader
from biofm_jax.config import config_to_dict
from biofm_jax.data.artifacts import copy_regular_files
from biofm_jax.eval.model_card import CARD_FILE, card_markdown, model_card
from biofm_jax.export_loader import (ARTIFACTS_DIR, FORMAT_VERSION, INFO_FILE, LOADER_FILE, MODEL_FILE, PARAMS_FILE,
                                     ExportedModel, load_exported)
from biofm_jax.modalities.registry import model_artifact_files
from biofm_jax.train.runs import open_run

__all__ = ["export_embedding_model", "export_run", "load_exported", "ExportedModel"]


def export_embedding_model(model: Any, params: Any, batch_spec: Mapping[str, Mapping[str, tuple]],
                           out_dir: str | os.PathLike, *, output: str | tuple[str, ...],
                           artifacts_dir: str | os.PathLike | None = None, artifact_files: Sequence[str] = (),
                           metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Serialises `model.apply(params, batch)[output...]` for batches shaped like `batch_spec`
  (`{modality: {field: (shape, dtype)}}`, no batch axis), e.g. a data module's
  `embedding_spec()`. `params` may be sharded; they are gathered to the host.

  `artifact_files` (paths relative to `artifacts_dir`) are the only files copied into the
  export's `artifacts/`: an allow-list, so data a run keeps beside its vocabularies (the
  event store's patient rows, a generated cohort, labels) never travels with the model."""
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"export: {out} exists and is not empty; choose a new directory")
  if artifact_files and artifacts_dir is None:
    raise ValueError("export: artifact_files were named without the artifacts_dir they are in")
  # As `train.step.output_path`.
  path = (output, "embedding") if isinstance(output, str) else tuple(output)
  leaves, treedef = jax.tree.flatten(jax.device_get(params))
  leaves = [np.asarray(leaf) for leaf in leaves]

  def embed(param_leaves, batch):
    out = model.apply({"params": jax.tree.unflatten(treedef, param_leaves)}, batch, train=False)
    for key in path:
      out = out[key]
    return out

  (batch_size,) = jax.export.symbolic_shape("batch")
  batch_shapes = {m: {name: jax.ShapeDtypeStruct((batch_size,) + tuple(shape), np.dtype(dtype))
                      for name, (shape, dtype) in spec.items()} for m, spec in batch_spec.items()}
  param_shapes = [jax.ShapeDtypeStruct(leaf.shape, leaf.dtype) for leaf in leaves]
  exported = jax.export.export(jax.jit(embed), platforms=("cpu", "cuda", "tpu"))(param_shapes, batch_shapes)

  out.mkdir(parents=True, exist_ok=True)
  (out / MODEL_FILE).write_bytes(exported.serialize())
  np.savez(out / PARAMS_FILE, *leaves)
  info = {"format_version": FORMAT_VERSION, "output": list(path), "num_params": int(sum(x.size for x in leaves)),
          "inputs": {m: {name: {"shape": list(shape), "dtype": np.dtype(dtype).name}
                         for name, (shape, dtype) in spec.items()} for m, spec in batch_spec.items()},
          **dict(metadata or {})}
  (out / INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))
  (out / ARTIFACTS_DIR).mkdir()
  if artifacts_dir is not None:
    copy_regular_files(artifacts_dir, out / ARTIFACTS_DIR, artifact_files, f"export of {artifacts_dir}")
  shutil.copyfile(export_loader.__file__, out / LOADER_FILE)  # the standalone loader travels with the model
  return out


# ---------------------------------------------------------------- a training run
def output_path(flag: str, data_module: Any) -> str | tuple[str, ...]:
  """What the export returns: '' (the data's own embedding; a fine-tuned run's task logits),
  'fused', 'contrastive:<modality>', or for a fine-tuned run 'task' or 'embedding'."""
  if "task" in data_module.example_spec():  # a fine-tuned model
    return ("task", "embedding") if flag == "embedding" else ("task", "logits")
  if flag == "fused":
    return ("fused", "embedding")
  if flag.startswith("contrastive:"):
    return ("contrastive", flag.split(":", 1)[1])
  if flag:
    return flag
  return ("fused", "embedding") if data_module.name == "multimodal" else data_module.name


def export_run(workdir: str | pathlib.Path, out: str | pathlib.Path, *, output: str = "",
               config: ml_collections.ConfigDict | None = None, report: str | pathlib.Path | None = None,
               provenance: Mapping[str, Any] | None = None) -> tuple[pathlib.Path, int]:
  """Exports the latest checkpoint of `workdir` (with its saved config unless `config`) to the
  new directory `out`; returns (the export directory, the step exported). A fine-tuned run's
  export carries its model card (`eval/model_card.py`: export.json's `model_card` and
  MODEL_CARD.md), with the held-out figures of `report` (an evaluation's output folder, or its
  report.json) when given."""
  workdir = pathlib.Path(workdir).absolute()
  if not (workdir / "checkpoints").is_dir():
    raise ValueError(f"{workdir} has no checkpoints directory: not a training run")
  config, data, setup, params, step = open_run(workdir, config)
  inputs = {m: spec for m, spec in data.embedding_spec().items() if m != "task"}  # targets are not inputs
  metadata = {**(provenance or {"config": "saved in the checkpoint", "overrides": {}}), "step": step,
              "workdir": str(workdir), "data": config_to_dict(config.data), "objective": config.objective.name}
  if "multimodal" in config.data:  # how each joined modality's records are read (`eval/predict_subjects.py`)
    metadata["modality_objectives"] = {m: config.objective[m].name for m in config.data.multimodal.modalities}
  if isinstance(metadata["data"].get("ehr"), dict):  # configs saved before the field: the rule training applied
    metadata["data"]["ehr"].setdefault("drop_duplicates", True)
  if "task" in config:
    metadata["task"] = {"name": config.task.name, **dataclasses.asdict(data.info), "config": config_to_dict(config.task),
                        "prediction_time_cut": data.cut}
    if getattr(data, "label_classes", ()):  # a record column's values behind the class ids
      metadata["task"]["label_values"] = list(data.label_classes)
    metadata["model_card"] = model_card(config, data, workdir, step=step, report=_read_report(report))
  path = export_embedding_model(setup.model, params, inputs, out, output=output_path(output, data),
                                artifacts_dir=workdir / "artifacts",
                                artifact_files=model_artifact_files(workdir / "artifacts"), metadata=metadata)
  if "model_card" in metadata:
    (path / CARD_FILE).write_text(card_markdown(metadata["model_card"]))
  return path, step


def _read_report(report: str | pathlib.Path | None) -> dict | None:
  if not report:
    return None
  path = pathlib.Path(report)
  path = path / "report.json" if path.is_dir() else path
  if not path.is_file():
    raise FileNotFoundError(f"export: the evaluation report {path} does not exist (evaluate.py writes report.json)")
  return json.loads(path.read_text())
