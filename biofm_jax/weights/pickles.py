"""Plain values from a pickle file, where a public format ships its dictionaries as pickles
(Geneformer's token and gene-median dictionaries).

Unpickling can run any code a file names. This unpickler rebuilds no class but numpy's
scalar and dtype (the median dictionary holds numpy floats), and only for numeric dtypes;
anything else in the file (a class, a function, a reduce of any other callable) is refused
with the file and the name it asked for. The result is then checked to be a dict of the
expected key and value types and returned as plain Python values.
"""
from __future__ import annotations

import io
import os
import pathlib
import pickle
from typing import Any

import numpy as np

# (module, name) -> what the file may rebuild. numpy's scalar(dtype, bytes) reads a number from
# its bytes; dtype(...) names a type. Both modules' spellings: numpy 2 renamed numpy.core.
_ALLOWED = {("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}
_NUMERIC_KINDS = "biuf"  # bool, int, unsigned, float
MAX_BYTES = 512 << 20  # a gene dictionary is a few MB; a larger file is not one


class _PlainValues(pickle.Unpickler):
  def __init__(self, file, where: str):
    super().__init__(file)
    self.where = where

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) not in _ALLOWED:
      raise ValueError(f"{self.where}: the pickle asks for {module}.{name}; only plain dicts, lists, "
                       f"strings and numbers are read")
    found = super().find_class(module, name)
    if name == "dtype":
      def numeric_dtype(spec, *args):
        dtype = np.dtype(spec)
        if dtype.kind not in _NUMERIC_KINDS:
          raise ValueError(f"{self.where}: the pickle holds a numpy value of dtype {dtype}; only numbers are read")
        return found(spec, *args)
      return numeric_dtype
    return found


def read_plain_dict(path: str | os.PathLike, key_type: type, value_types: tuple[type, ...]) -> dict:
  """The dict a pickle file holds, its keys of `key_type` and values of `value_types`
  (numpy numbers read as Python ones); anything else is an error naming the file."""
  path = pathlib.Path(path)
  if path.is_symlink() or not path.is_file():
    raise ValueError(f"{path}: not a regular file")
  if path.stat().st_size > MAX_BYTES:
    raise ValueError(f"{path}: {path.stat().st_size} bytes, larger than a dictionary file ({MAX_BYTES})")
  try:
    value = _PlainValues(io.BytesIO(path.read_bytes()), str(path)).load()
  except ValueError:
    raise
  except Exception as e:  # noqa: BLE001 - a cut or garbled pickle raises many types
    raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e})") from None
  if not isinstance(value, dict):
    raise ValueError(f"{path}: holds a {type(value).__name__}, expected a dict")
  out = {}
  for key, item in value.items():
    item = item.item() if isinstance(item, np.generic) else item
    if not isinstance(key, key_type) or isinstance(item, bool) or not isinstance(item, value_types):
      raise ValueError(f"{path}: entry {key!r}: {type(item).__name__}, expected {key_type.__name__} keys and "
                       f"{' or '.join(t.__name__ for t in value_types)} values")
    out[key] = item
  return out
