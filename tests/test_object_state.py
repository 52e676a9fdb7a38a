"""The pickle-free codec of prepared datasets' data modules (`data/object_state.py`):
values round-trip exactly, shared objects stay shared, and nothing off the allow-list of
storable classes is written or rebuilt (crafted folders: `test_shared_folders.py`)."""
from __future__ import annotations

import dataclasses
import functools
import json

import numpy as np
import pytest

from biofm_jax.data import object_state
from biofm_jax.data.module import KeyByModality
from biofm_jax.modalities.imaging.data import ImagingSettings


def _round_trip(value):
  tree, arrays = object_state.encode(value)
  tree = json.loads(json.dumps(tree))  # what the file holds
  return object_state.decode(tree, object_state.from_npz_bytes(object_state.to_npz_bytes(arrays)))


def test_plain_values_arrays_and_containers_round_trip():
  value = {"a": [1, 2.5, None, True, "x"], (1, "b"): (np.arange(4, dtype=np.int16), np.float32(0.5)),
           3: {frozenset({1, 2}), "s"}, "inf": float("inf"), "dtype": np.dtype("<f4"), "slice": slice(1, None, 2)}
  back = _round_trip(value)
  assert back.keys() == value.keys()
  assert back["a"] == value["a"] and back[3] == value[3] and back["inf"] == float("inf")
  array, scalar = back[(1, "b")]
  np.testing.assert_array_equal(array, np.arange(4, dtype=np.int16))
  assert array.dtype == np.int16 and scalar.dtype == np.float32 and scalar == np.float32(0.5)
  assert back["dtype"] == np.dtype("<f4") and back["slice"] == slice(1, None, 2)


def test_biofm_objects_rebuild_with_their_state_and_sharing():
  settings = ImagingSettings.from_config(__import__("ml_collections").ConfigDict(dict(
      spatial_dims=2, image_size=(8, 8), patch_size=(4, 4), channels=1, spacing=(1.0, 1.0), intensity="auto",
      ct_window=(-1000.0, 1000.0), crop_scale=(0.5, 1.0), flip_axes=(1,), brightness=0.1, contrast=0.1,
      mask_ratio=0.5, on_error="raise")))
  key = KeyByModality("imaging")
  back = _round_trip({"settings": settings, "keys": [key, key]})
  assert dataclasses.is_dataclass(back["settings"]) and back["settings"] == settings  # frozen, equal
  first, second = back["keys"]
  assert first is second and isinstance(first, KeyByModality) and first.map({"x": 1}) == {"imaging": {"x": 1}}


def test_foreign_objects_functions_and_object_arrays_are_refused_when_written():
  for value, what in [(functools.partial(print), "functools.partial"), (lambda: 0, "function"),
                      (np.array([{}], dtype=object), "array of Python objects")]:
    with pytest.raises(ValueError, match=rf"module\['x'\]: .*{what}"):
      object_state.encode({"x": value})


def test_reading_rebuilds_only_allow_listed_classes():
  tree = {"__state__": "object", "class": "os.system", "ref": 0, "state": {}}
  with pytest.raises(ValueError, match="'os.system' is not on the allow-list"):
    object_state.decode(tree, {})
  tree["class"] = "biofm_jax.data.object_state.encode"  # a function, not a class
  with pytest.raises(ValueError, match="not on the allow-list"):
    object_state.decode(tree, {})
  tree["class"] = "biofm_jax.data.module.KeyByModality"  # marked @storable
  assert isinstance(object_state.decode(tree, {}), KeyByModality)
