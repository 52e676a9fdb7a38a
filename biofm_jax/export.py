"""Exported models: a pre-trained encoder serialised with `jax.export`, run without the
config, the model code or the training code.

`export_embedding_model` writes a directory:

  model.jax_export   the serialised StableHLO of `(parameters, batch) -> embeddings`, with a
                     symbolic batch size, so any number of examples runs
  params.npz         the parameters, in the order the exported function takes them
  export.json        what the model takes and gives: the input fields (shape and dtype per
                     example, keyed by modality), the output, and the run it came from
  artifacts/         the vocabularies and preprocessing statistics the inputs were made with

`load_exported(directory)` gives an `ExportedModel` that needs only jax and numpy:
`model(batch) -> [B, D]` numpy embeddings. Inputs are the tokenised / normalised batches the
data modules produce (see `data/batch.py`); the saved artifacts are those modules' inputs.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

MODEL_FILE, PARAMS_FILE, INFO_FILE, ARTIFACTS_DIR = "model.jax_export", "params.npz", "export.json", "artifacts"
FORMAT_VERSION = 1


def export_embedding_model(model: Any, params: Any, batch_spec: Mapping[str, Mapping[str, tuple]],
                           out_dir: str | os.PathLike, *, output: str | tuple[str, ...],
                           artifacts_dir: str | os.PathLike | None = None,
                           metadata: Mapping[str, Any] | None = None) -> pathlib.Path:
  """Serialises `model.apply(params, batch)[output...]` for batches shaped like `batch_spec`
  (`{modality: {field: (shape, dtype)}}`, no batch axis), e.g. `setup.batch_spec(data,
  embedding=True)`. `params` may be sharded; they are gathered to the host."""
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise ValueError(f"export: {out} exists and is not empty; choose a new directory")
  # As `train.step.output_path`, not imported: this module (the loader) imports only jax and numpy.
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
  if artifacts_dir is not None:
    shutil.copytree(artifacts_dir, out / ARTIFACTS_DIR, ignore=skip_generated_data)
  return out


def skip_generated_data(directory: str, names: list[str]) -> list[str]:
  """Vocabularies and statistics are small JSON files; generated cohorts and labels are
  data, not artifacts of the model."""
  return [name for name in names if name.startswith(("synthetic", "labels_"))]


class ExportedModel:
  """A loaded export: `model(batch)` runs it on a dict of numpy arrays shaped as `inputs`."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    for name in (MODEL_FILE, PARAMS_FILE, INFO_FILE):
      if not (self.directory / name).exists():
        raise FileNotFoundError(f"{self.directory}: not an exported model (no {name})")
    self.info = json.loads((self.directory / INFO_FILE).read_text())
    if self.info.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{self.directory}: export format {self.info.get('format_version')}, this loader "
                       f"reads {FORMAT_VERSION}")
    self.exported = jax.export.deserialize(bytearray((self.directory / MODEL_FILE).read_bytes()))
    with np.load(self.directory / PARAMS_FILE) as arrays:
      self.params = [jnp.asarray(arrays[f"arr_{i}"]) for i in range(len(arrays.files))]
    self.inputs = self.info["inputs"]

  def check(self, batch: Mapping[str, Mapping[str, Any]]) -> dict:
    """The batch as the exported function takes it; errors name the modality and field."""
    out = {}
    for modality, fields in self.inputs.items():
      if modality not in batch:
        raise ValueError(f"{self.directory}: the batch lacks modality {modality!r} (expects {sorted(self.inputs)})")
      out[modality] = {}
      for name, spec in fields.items():
        if name not in batch[modality]:
          raise ValueError(f"{self.directory}: batch[{modality!r}] lacks field {name!r}")
        value = np.asarray(batch[modality][name])
        if list(value.shape[1:]) != spec["shape"] or value.dtype.name != spec["dtype"]:
          raise ValueError(f"{self.directory}: batch[{modality!r}][{name!r}] is {value.dtype.name}"
                           f"{list(value.shape)}, expected {spec['dtype']}[batch, *{spec['shape']}]")
        out[modality][name] = value
    return out

  def __call__(self, batch: Mapping[str, Mapping[str, Any]]) -> np.ndarray:
    return np.asarray(self.exported.call(self.params, self.check(batch)))


def load_exported(directory: str | os.PathLike) -> ExportedModel:
  return ExportedModel(directory)
