"""Tensors of a Hugging Face model folder, read one at a time from safetensors files.

A folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`
(its `weight_map`: tensor name -> shard file). Only safetensors are read here: the format
holds a JSON header and raw little-endian arrays, so reading it runs no stored code
(unlike pickle-based `.bin` / `.pth` files). Each tensor is memory-mapped and copied when
asked for, so converting a model holds the converted model and one tensor at a time.
"""
from __future__ import annotations

import json
import os
import pathlib
from typing import Iterator

import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class TensorFolder:
  """The tensors of a model folder: names, shapes, and each tensor as a numpy array."""

  def __init__(self, folder: str | os.PathLike):
    from safetensors import safe_open  # optional: the `weights` extra (pip install -e '.[weights]')

    self.folder = pathlib.Path(folder)
    self._open = safe_open
    self.files = self._tensor_files()
    self._handles: dict[pathlib.Path, object] = {}
    self._where: dict[str, pathlib.Path] = {}
    for file in sorted(set(self.files.values()) if self.files else []):
      for name in self._handle(file).keys():
        self._where[name] = file

  def _tensor_files(self) -> dict[str, pathlib.Path]:
    """Tensor name -> the file holding it, from the index; {} before the files are opened."""
    index = self.folder / INDEX_FILE
    single = self.folder / SINGLE_FILE
    if index.is_file():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index}: not a safetensors index with a weight_map ({e})") from None
      files = {}
      for name, file in weight_map.items():
        path = self._inside(file, index)
        files[name] = path
      return files
    if single.is_file():
      self._inside(SINGLE_FILE, single)
      return {"": single}
    found = sorted(p.name for p in self.folder.glob("*") if p.suffix in (".bin", ".pth", ".pt", ".ckpt"))
    hint = (f"; it holds {', '.join(found)}: pickle-based files are not read here, save the model with "
            f"`save_pretrained(..., safe_serialization=True)`" if found else "")
    raise ValueError(f"{self.folder}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

  def _inside(self, name: str, where: pathlib.Path) -> pathlib.Path:
    """`name` as a regular file inside the folder: a link, or a name that leaves the
    folder, is refused (a crafted index must not make us read elsewhere)."""
    path = self.folder / name
    if (os.path.isabs(name) or ".." in pathlib.PurePath(name).parts or path.is_symlink()
        or not path.is_file()):
      raise ValueError(f"{where}: tensor file {name!r} is not a regular file inside {self.folder}")
    return path

  def _handle(self, file: pathlib.Path):
    if file not in self._handles:
      try:
        self._handles[file] = self._open(str(file), framework="np")
      except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    return self._handles[file]

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(sorted(self._where))

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handle(self._where[name]).get_slice(name).get_shape())

  def get(self, name: str) -> np.ndarray:
    """The tensor `name` as a numpy array of its stored dtype (bfloat16 read as float32)."""
    if name not in self._where:
      raise ValueError(f"{self.folder}: no tensor {name!r}")
    try:
      array = self._handle(self._where[name]).get_tensor(name)
    except TypeError:  # numpy has no bfloat16: read the raw bits and widen them
      array = _bfloat16_as_float32(self._where[name], name)
    return np.asarray(array)

  def where(self, name: str) -> pathlib.Path:
    return self._where[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self.names)


def _bfloat16_as_float32(file: pathlib.Path, name: str) -> np.ndarray:
  """A bfloat16 tensor of a safetensors file as float32 (the header gives its byte range)."""
  with open(file, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_size))
    entry = header[name]
    if entry["dtype"] != "BF16":
      raise ValueError(f"{file}: tensor {name!r} has dtype {entry['dtype']}, which numpy cannot hold")
    start, end = entry["data_offsets"]
    f.seek(8 + header_size + start)
    bits = np.frombuffer(f.read(end - start), dtype="<u2").astype(np.uint32) << 16
  return bits.view(np.float32).reshape(entry["shape"])
