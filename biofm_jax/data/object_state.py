"""An object's state as JSON plus numpy arrays, and back, without pickle.

A prepared dataset (`prepared.py`) stores its data module (vocabularies, statistics,
settings, the transforms' parameters) so that training can run the remaining transforms
without the raw data. Pickle would let a shared folder run code when it is opened; this
codec cannot. It writes:

  None, bool, int, float, str          as themselves
  list, tuple, dict, set, frozenset    as tagged JSON (dict keys of any of these types)
  numpy arrays and scalars             as entries of one `.npz` (no object arrays)
  numpy dtypes, slices                 by value
  instances of the storable classes   as {class path, attribute state}

A class is storable only when its own module marks it with `@storable`: that adds it to an
allow-list keyed by its exact `module.qualname`. Reading looks a stored class path up in
that list and nowhere else: it imports nothing and follows no module attribute, so a
crafted folder cannot name `biofm_jax.some_module.tempfile._TemporaryFileCloser` or
`subprocess.Popen` and have it rebuilt. An instance is rebuilt with `object.__new__` and its
saved attributes (no constructor, function or other class runs); attribute names are plain
identifiers (no `__dunder__`). Anything else (functions, lambdas, open files, other
libraries' objects, unmarked classes) is refused at writing, naming where it sits.
"""
from __future__ import annotations

import io
from typing import Any, Mapping, TypeVar

import numpy as np

_TAG = "__state__"
_STORABLE: dict[str, type] = {}  # the allow-list: exact "module.qualname" -> class
T = TypeVar("T", bound=type)


def storable(cls: T) -> T:
  """Marks `cls` as one whose instances a prepared dataset may store and rebuild: a class
  whose state is plain values, arrays and other storable objects, and whose instances do
  nothing when rebuilt or collected (no `__del__`, no resource held)."""
  if "<locals>" in cls.__qualname__:
    raise TypeError(f"{cls.__qualname__}: a class defined inside a function cannot be storable")
  _STORABLE[class_path(cls)] = cls
  return cls


def class_path(cls: type) -> str:
  return f"{cls.__module__}.{cls.__qualname__}"


def storable_classes() -> dict[str, type]:
  """The allow-list as it stands (classes are added as their modules are imported)."""
  return dict(_STORABLE)


def encode(value: Any, where: str = "module") -> tuple[Any, dict[str, np.ndarray]]:
  """(JSON-able tree, {name: array}) holding `value`; ValueError names an unstorable part."""
  arrays: dict[str, np.ndarray] = {}
  return _encode(value, where, arrays, {}), arrays


def decode(tree: Any, arrays: Mapping[str, np.ndarray]) -> Any:
  """The object `encode` described; ValueError for a class not on the allow-list."""
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
  path = class_path(type(value))
  if _STORABLE.get(path) is not type(value):
    raise ValueError(f"{where}: a {path} cannot be stored (only classes marked @object_state.storable, "
                     f"numpy arrays and plain values)")
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
    state = tree.get("state")
    if not isinstance(state, dict):
      raise ValueError(f"stored object of class {tree.get('class')!r} has no attribute state")
    obj = object.__new__(_class(tree.get("class")))
    objects[tree["ref"]] = obj
    for name, value in state.items():
      if not name.isidentifier() or name.startswith("__"):
        raise ValueError(f"stored {tree['class']} has an attribute named {name[:40]!r}; only plain names are read")
      object.__setattr__(obj, name, _decode(value, arrays, objects))  # frozen dataclasses too
    return obj
  raise ValueError(f"unknown stored value {str(tree)[:80]!r}")


def _class(path: Any) -> type:
  """The storable class stored under `path`: looked up in the allow-list only."""
  cls = _STORABLE.get(path) if isinstance(path, str) else None
  if cls is None:
    raise ValueError(f"stored class {str(path)[:120]!r} is not on the allow-list of storable classes "
                     f"(classes marked @object_state.storable); nothing else is rebuilt")
  return cls
