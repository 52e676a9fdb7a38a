"""Loads a model exported by biofm_jax (`experiments/export.py`) with jax, numpy and flatbuffers only.

This file is copied into every export folder as `loader.py`, so a deployer needs neither
the library nor its training code:

  import sys; sys.path.insert(0, "exports/high_risk")
  from loader import load_exported
  model = load_exported("exports/high_risk")
  outputs = model(batch)      # {modality: {field: array [B, ...]}} -> numpy [B, ...]

It imports only the standard library, numpy and jax (jax.export deserialises with
flatbuffers). `export.json` beside the model says what the inputs are (shape and dtype per
example) and, for a fine-tuned model, the task: how to turn the raw outputs (logits) into
probabilities, values or risks. `experiments/predict.py` does the whole path from raw MEDS
records with the library's reader and tokeniser.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

MODEL_FILE, PARAMS_FILE, INFO_FILE, ARTIFACTS_DIR = "model.jax_export", "params.npz", "export.json", "artifacts"
LOADER_FILE = "loader.py"
FORMAT_VERSION = 2  # 2 adds the run's data config and the task's label settings to export.json
READABLE_VERSIONS = (1, 2)


class ExportedModel:
  """A loaded export: `model(batch)` runs it on a dict of numpy arrays shaped as `inputs`."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    for name in (MODEL_FILE, PARAMS_FILE, INFO_FILE):
      if not (self.directory / name).exists():
        raise FileNotFoundError(f"{self.directory}: not an exported model (no {name})")
    self.info = json.loads((self.directory / INFO_FILE).read_text())
    if self.info.get("format_version") not in READABLE_VERSIONS:
      raise ValueError(f"{self.directory}: export format {self.info.get('format_version')}, this loader "
                       f"reads {READABLE_VERSIONS}")
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
  """The model exported into `directory`."""
  return ExportedModel(directory)
