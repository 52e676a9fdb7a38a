"""Loads a model exported by biofm_jax (`experiments/export.py`) with jax, numpy and flatbuffers only.

This file is copied into every export folder as `loader.py`, so a deployer needs neither
the library nor its training code:

  import importlib.util   # this one file, by its path: never the export folder on sys.path,
  spec = importlib.util.spec_from_file_location("biofm_export_loader", "exports/high_risk/loader.py")
  loader = importlib.util.module_from_spec(spec); spec.loader.exec_module(loader)
  model = loader.load_exported("exports/high_risk")   # where a shared folder's numpy.py would shadow numpy
  outputs = model(batch)      # {modality: {field: array [B, ...]}} -> numpy [B, ...]

It imports only the standard library, numpy and jax (jax.export deserialises with
flatbuffers). `export.json` beside the model says what the inputs are (shape and dtype per
example) and, for a fine-tuned model, the task: how to turn the raw outputs (logits) into
probabilities, values or risks. `experiments/predict.py` does the whole path from raw MEDS
records with the library's reader and tokeniser.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import sys
import tempfile
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
    self.info = _read(self.directory / INFO_FILE, "the export's description (JSON)",
                      lambda path: json.loads(path.read_text()))
    if not isinstance(self.info, dict) or self.info.get("format_version") not in READABLE_VERSIONS:
      version = self.info.get("format_version") if isinstance(self.info, dict) else None
      raise ValueError(f"{self.directory}: export format {version}, this loader reads {READABLE_VERSIONS}")
    self.inputs = self.info["inputs"]
    self.exported = _read(self.directory / MODEL_FILE, "the serialised model", _deserialize)
    arrays = _read(self.directory / PARAMS_FILE, "the parameters (npz)", _load_arrays)
    _check_params(self.directory / PARAMS_FILE, arrays, _param_avals(self.exported, self.inputs))
    self.params = [jnp.asarray(a) for a in arrays]

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


def _read(path: pathlib.Path, what: str, read) -> Any:
  """`read(path)`, or one ValueError naming the file when its bytes are damaged or cut short."""
  try:
    return read(path)
  except Exception as e:  # zipfile, struct, flatbuffers and the StableHLO parser raise many types
    kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    raise ValueError(f"{path}: cannot read {what}: the file is damaged or truncated "
                     f"({kind}{': ' + reason if reason else ''}); export the model again") from e


def _deserialize(path: pathlib.Path):
  """The exported function, its StableHLO parsed now, so damage shows here and not at the
  first call. The parser's own complaints on fd 2 are dropped on failure (the error says
  it), so a damaged file ends in one line."""
  exported = jax.export.deserialize(bytearray(path.read_bytes()))
  with _native_stderr_held():
    exported.mlir_module()
  return exported


@contextlib.contextmanager
def _native_stderr_held():
  """Holds what native code writes to file descriptor 2 inside the block; writes it out
  afterwards unless the block raised."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as held:
    os.dup2(held.fileno(), 2)
    try:
      yield
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    held.seek(0)
    sys.stderr.write(held.read().decode(errors="replace"))  # reached only when the block succeeded


def _load_arrays(path: pathlib.Path) -> list[np.ndarray]:
  with np.load(path, allow_pickle=False) as arrays:
    return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def _param_avals(exported, inputs: Mapping[str, Mapping[str, Any]]) -> list:
  """The parameters the exported function takes: its inputs before the batch's fields."""
  batch_fields = sum(len(fields) for fields in inputs.values())
  return list(exported.in_avals[:len(exported.in_avals) - batch_fields])


def _check_params(path: pathlib.Path, arrays: list[np.ndarray], expected: list) -> None:
  if len(arrays) != len(expected):
    raise ValueError(f"{path}: holds {len(arrays)} arrays, the exported model takes {len(expected)} parameters")
  for i, (array, aval) in enumerate(zip(arrays, expected)):
    if tuple(array.shape) != tuple(aval.shape) or array.dtype != aval.dtype:
      raise ValueError(f"{path}: arr_{i} is {array.dtype.name}{list(array.shape)}, the exported model takes "
                       f"{np.dtype(aval.dtype).name}{list(aval.shape)}")


def load_exported(directory: str | os.PathLike) -> ExportedModel:
  """The model exported into `directory`."""
  return ExportedModel(directory)
