"""An object's state as JSON plus numpy arrays, and back, without pickle.

A prepared dataset (`prepared.py`) stores its data module (vocabularies, statistics,
settings, the transforms' parameters) so that training can run the remaining transforms
without the raw data. Pickle would let a shared folder run code when it is opened; this
codec cannot. It writes:

  None, bool, int, float, str          as themselves
  list, tuple, dict, set, frozenset    as tagged JSON (dict keys of any of these types)
  numpy arrays and scalars             as entries of one `.npz` (no object arrays)
  numpy dtypes, slices                 by value
  instances of biofm_jax's own classes as {class path, attribute state}

and reading rebuilds an instance of a biofm_jax class with `object.__new__` and its saved
attributes: no constructor, function or foreign class ever runs. Anything else (functions,
lambdas, open files, other libraries' objects) is refused at writing, naming where it sits.
"""
from __future__ import annotations

import importlib
import io
from typing import Any, Mapping

import numpy as np

PACKAGE = "biofm_jax."
_TAG = "__state__"


def encode(value: Any, where: str = "module") -> tuple[Any, dict[str, np.ndarray]]:
  """(JSON-able tree, {name: array}) holding `value`; ValueError names an unstorable part."""
  arrays: dict[str, np.ndarray] = {}
  return _encode(value, where, arrays, {}), arrays


def decode(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
  """The object `encode` described; ValueError for a class outside biofm_jax."""
  return _decode(tree, arrays, {})


def to_npz_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  return buffer.getvalue()


def from_npz_bytes(data: bytes) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {name: npz[name] for name in npz.files}


# ---------------------------------------------------------------- writing
def _encode(value: Any, where: str, arrays: dict, seen: dict) -> Any:
  if isinstance(value, (np.ndarray, np.generic)):  # before float: np.float64 is a float
    array = np.asarray(value)
    if array.dtype.kind == "O":
      raise ValueError(f"{where}: a numpy array of Python objects cannot be stored")
    name = f"a{len(arrays)}"
    arrays[name] = array
    return {_TAG: "array" if isinstance(value, np.ndarray) else "scalar", "name": name}
  if value is None or isinstance(value, (bool, int, str)):
    return value
  if isinstance(value, float):
    return value if np.isfinite(value) else {_TAG: "float", "value": repr(value)}
  if isinstance(value, np.dtype):
    return {_TAG: "dtype", "value": value.str}
  if isinstance(value, slice):
    return {_TAG: "slice", "value": [value.start, value.stop, value.step]}
  if isinstance(value, (list, tuple, set, frozenset)):
    items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
    encoded = [_encode(v, f"{where}[{i}]", arrays, seen) for i, v in enumerate(items)]
    return encoded if type(value) is list else {_TAG: type(value).__name__, "items": encoded}
  if type(value) is dict:
    return {_TAG: "dict", "items": [[_encode(k, f"{where} key", arrays, seen),
                                     _encode(v, f"{where}[{k!r}]", arrays, seen)] for k, v in value.items()]}
  cls = type(value)
  path = f"{cls.__module__}.{cls.__qualname__}"
  if not path.startswith(PACKAGE) or "<locals>" in path:
    raise ValueError(f"{where}: a {path} cannot be stored (only biofm_jax's own classes, numpy arrays "
                     f"and plain values)")
  if id(value) in seen:  # one vocabulary held by the module and by its transforms stays one
    return {_TAG: "ref", "ref": seen[id(value)][0]}
  seen[id(value)] = (len(seen), value)  # the value is kept alive so its id is not reused
  return {_TAG: "object", "class": path, "ref": seen[id(value)][0],
          "state": {k: _encode(v, f"{where}.{k}", arrays, seen) for k, v in _attributes(value).items()}}


def _attributes(value: Any) -> dict[str, Any]:
  state = dict(getattr(value, "__dict__", {}))
  for cls in type(value).__mro__:
    for slot in getattr(cls, "__slots__", ()):
      if slot != "__dict__" and hasattr(value, slot):
        state[slot] = getattr(value, slot)
  return state


# ---------------------------------------------------------------- reading
def _decode(tree: Any, arrays: Mapping[str, np.ndarray], objects: dict) -> Any:
  if isinstance(tree, list):
    return [_decode(v, arrays, objects) for v in tree]
  if not isinstance(tree, dict):
    return tree
  kind = tree.get(_TAG)
  if kind == "float":
    return float(tree["value"])
  if kind in ("array", "scalar"):
    if tree["name"] not in arrays:
      raise ValueError(f"array {tree['name']!r} is missing from the stored arrays")
    array = arrays[tree["name"]]
    return array if kind == "array" else array[()]
  if kind == "dtype":
    return np.dtype(tree["value"])
  if kind == "slice":
    return slice(*tree["value"])
  if kind in ("tuple", "set", "frozenset"):
    items = (_decode(v, arrays, objects) for v in tree["items"])
    return {"tuple": tuple, "set": set, "frozenset": frozenset}[kind](items)
  if kind == "dict":
    return {_decode(k, arrays, objects): _decode(v, arrays, objects) for k, v in tree["items"]}
  if kind == "ref":
    if tree["ref"] not in objects:
      raise ValueError(f"stored reference {tree['ref']} precedes its object")
    return objects[tree["ref"]]
  if kind == "object":
    obj = object.__new__(_class(tree["class"]))
    objects[tree["ref"]] = obj
    for name, value in tree["state"].items():
      object.__setattr__(obj, name, _decode(value, arrays, objects))  # frozen dataclasses too
    return obj
  raise ValueError(f"unknown stored value {str(tree)[:80]!r}")


def _class(path: str) -> type:
  """A class of biofm_jax by its dotted path; nothing outside the package is looked up."""
  if not path.startswith(PACKAGE):
    raise ValueError(f"stored class {path!r} is not one of biofm_jax's")
  module_name, _, name = path.rpartition(".")
  while module_name.startswith(PACKAGE):
    try:
      module = importlib.import_module(module_name)
      break
    except ModuleNotFoundError:  # a nested class: module.Outer.Inner
      module_name, _, outer = module_name.rpartition(".")
      name = f"{outer}.{name}"
  else:
    raise ValueError(f"stored class {path!r} not found in biofm_jax")
  obj: Any = module
  for part in name.split("."):
    obj = getattr(obj, part, None)
  if not isinstance(obj, type):
    raise ValueError(f"stored class {path!r} not found in biofm_jax")
  return obj
