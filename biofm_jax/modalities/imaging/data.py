"""The imaging modality's data module: validated settings and `ImagingData`.

This module owns how `config.data.imaging` becomes a source and a list of Grain
transforms (defined in `transforms.py`, re-exported here) for 2D images and 3D
volumes alike, and what the pipeline and training loop ask of a modality: `source`,
`transforms`, `example_spec`, `model_info`, `summary`, plus `labels` for linear probes.

  train: Resample -> Normalize -> RandomResizedCrop -> RandomFlip -> IntensityJitter
         -> ToImagingExample -> MaskPatches
  eval:  Resample -> Normalize -> CenterResize -> ToImagingExample -> MaskPatches

With `augment="device"` the training stream stops at a fixed canvas and a seed, and the
crop, flips and jitter run batched inside the jitted step (`device_augment.py`):
  train: Resample -> Normalize -> CenterResize(canvas) -> ToImagingExample -> MaskPatches
         -> AugmentSeed            (then, in the step: crop, flips, jitter)
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from biofm_jax.data import batch, object_state
from biofm_jax.data.masking import MaskPatches
from biofm_jax.data.sources import index_skips, read_skips
from biofm_jax.data.module import MASKED_PATCHES, DataModuleDefaults, check_targets, KeyByModality
from biofm_jax.data.config_fields import config_field, require
from biofm_jax.modalities.imaging.transforms import (  # noqa: F401  (re-exported)
    INTENSITY_MODES, CenterResize, IntensityJitter, NormalizeIntensity,
    RandomFlip, RandomResizedCrop, ResampleToSpacing, ToImagingExample, record_name,
    resize_linear, sample_crop_box)
from biofm_jax.modalities.imaging.device_augment import AUGMENT_SEED, AugmentSeed, DeviceAugment
from biofm_jax.modalities.imaging.synthetic import write_synthetic_images
from biofm_jax.modalities.imaging import source as imaging_source

TARGETS = (MASKED_PATCHES,)  # what its examples can carry for an objective (data/module.py)
ON_ERROR = ("raise", "skip")
AUGMENT = ("host", "device")
SYNTHETIC_DIRNAME = "synthetic_imaging"
MANIFEST_FILENAME = "manifest.csv"
_CONFIG_PREFIX = "config.data.imaging"

log = logging.getLogger(__name__)


# ================================================================ settings
@object_state.storable
@dataclasses.dataclass(frozen=True)
class ImagingSettings:
  """`config.data.imaging`, checked once; every error names the config field."""
  spatial_dims: int
  image_size: tuple[int, ...]
  patch_size: tuple[int, ...]
  channels: int
  spacing: tuple[float, ...]  # () keeps each image's native spacing
  intensity: str
  ct_window: tuple[float, float]
  crop_scale: tuple[float, float]
  flip_axes: tuple[int, ...]
  brightness: float
  contrast: float
  mask_ratio: float
  on_error: str
  augment: str = "host"  # or "device": crop, flips and jitter inside the jitted step
  canvas_size: tuple[int, ...] = ()  # device augmentation's input size; () = image_size

  @classmethod
  def from_config(cls, cfg: Any) -> ImagingSettings:
    get = lambda name: _field(cfg, name)  # noqa: E731
    settings = cls(
        spatial_dims=_int(get("spatial_dims"), "spatial_dims"),
        image_size=_ints(get("image_size"), "image_size"),
        patch_size=_ints(get("patch_size"), "patch_size"),
        channels=_int(get("channels"), "channels"),
        spacing=_floats(get("spacing"), "spacing"),
        intensity=str(get("intensity")),
        ct_window=_floats(get("ct_window"), "ct_window"),
        crop_scale=_floats(get("crop_scale"), "crop_scale"),
        flip_axes=_ints(get("flip_axes"), "flip_axes"),
        brightness=float(get("brightness")),
        contrast=float(get("contrast")),
        mask_ratio=float(get("mask_ratio")),
        on_error=str(get("on_error")),
        augment=str(cfg.get("augment", "host")),
        canvas_size=_ints(cfg.get("canvas_size", ()), "canvas_size"))
    settings.validate()
    return settings

  def validate(self) -> None:
    """Raises ValueError naming the first field that is out of range."""
    n = self.spatial_dims
    _require(n in (2, 3), "spatial_dims", self.spatial_dims, "2 (images) or 3 (volumes)")
    for name in ("image_size", "patch_size"):
      value = getattr(self, name)
      _require(len(value) == n, name, value, f"{n} sizes, one per spatial dim (spatial_dims={n})")
      _require(all(v >= 1 for v in value), name, value, "positive sizes")
    multiples = all(i % p == 0 for i, p in zip(self.image_size, self.patch_size))
    _require(multiples, "image_size", self.image_size,
             f"a multiple of patch_size {self.patch_size} on every axis")
    _require(self.num_patches >= 2, "patch_size", self.patch_size,
             f"at least 2 patches in image_size {self.image_size} (one visible, one masked)")
    _require(self.channels >= 1, "channels", self.channels, "a positive channel count")
    _require(len(self.spacing) in (0, n) and all(s > 0 for s in self.spacing), "spacing",
             self.spacing, f"() for native spacing, or {n} positive mm values")
    _require(self.intensity in INTENSITY_MODES, "intensity", self.intensity,
             f"one of {INTENSITY_MODES}")
    _require(len(self.ct_window) == 2 and self.ct_window[1] > 0, "ct_window", self.ct_window,
             "(center, width) in HU with width > 0")
    _require(len(self.crop_scale) == 2 and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             "crop_scale", self.crop_scale, "(min, max) with 0 < min <= max <= 1")
    _require(all(0 <= a < n for a in self.flip_axes)
             and len(set(self.flip_axes)) == len(self.flip_axes),
             "flip_axes", self.flip_axes, f"distinct spatial axes in [0, {n})")
    _require(self.brightness >= 0, "brightness", self.brightness, ">= 0")
    _require(0 <= self.contrast < 1, "contrast", self.contrast, "in [0, 1)")
    _require(0 < self.mask_ratio < 1, "mask_ratio", self.mask_ratio, "in (0, 1)")
    _require(self.on_error in ON_ERROR, "on_error", self.on_error, f"one of {ON_ERROR}")
    _require(self.augment in AUGMENT, "augment", self.augment, f"one of {AUGMENT}")
    _require(len(self.canvas_size) in (0, n) and all(c >= 1 for c in self.canvas_size), "canvas_size",
             self.canvas_size, f"() for image_size, or {n} positive sizes")

  @property
  def canvas(self) -> tuple[int, ...]:
    """The fixed size device augmentation crops from."""
    return self.canvas_size or self.image_size

  @property
  def num_patches(self) -> int:
    return int(np.prod([i // p for i, p in zip(self.image_size, self.patch_size)]))


_field = functools.partial(config_field, prefix=_CONFIG_PREFIX)

_require = functools.partial(require, prefix=_CONFIG_PREFIX)


def _as_tuple(value: Any, name: str) -> tuple:
  if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
    raise ValueError(f"{_CONFIG_PREFIX}.{name} is {value!r}, expected a tuple")
  return tuple(value)


def _ints(value: Any, name: str) -> tuple[int, ...]:
  items = _as_tuple(value, name)
  if not all(float(v).is_integer() for v in items):
    raise ValueError(f"{_CONFIG_PREFIX}.{name} is {value!r}, expected integers")
  return tuple(int(v) for v in items)


def _floats(value: Any, name: str) -> tuple[float, ...]:
  return tuple(float(v) for v in _as_tuple(value, name))


def _int(value: Any, name: str) -> int:
  return _ints((value,), name)[0]


# ================================================================ data module
@object_state.storable
class ImagingData(DataModuleDefaults):
  """2D images or 3D volumes as the pipeline and training loop see them."""
  name = "imaging"

  def __init__(self, dataset: Any, settings: ImagingSettings, *, targets: str):
    check_targets("ImagingData", targets, TARGETS)
    settings.validate()
    self.dataset, self.settings, self.targets = dataset, settings, targets

  @classmethod
  def from_config(cls, cfg: Any, *, targets: str,
                  artifacts_dir: str | os.PathLike) -> ImagingData:
    """Opens the images named by `cfg` (= config.data.imaging); synthetic when path is ""."""
    check_targets("ImagingData", targets, TARGETS)  # before any data is generated or read
    settings = ImagingSettings.from_config(cfg)
    path = Path(cfg.path) if cfg.path else _synthetic_images(cfg, settings, Path(artifacts_dir))
    dataset = imaging_source.ImagingDataset(path, spatial_dims=settings.spatial_dims, on_error=settings.on_error,
                                            skip_file=read_skips.skip_file_for(artifacts_dir),
                                            index_skip_file=index_skips.index_skip_file_for(artifacts_dir))
    _check_channels(settings, getattr(dataset, "channels", None), path)
    return cls(dataset, settings, targets=targets)

  def source(self, split: str):
    return self.dataset.source(split)

  def transforms(self, train: bool, mask: bool = True) -> list:
    """Eval masking stays random but the pipeline seeds it per position: repeatable.

    `mask=False` leaves out the MAE masking: every patch reaches the encoder, as
    embedding extraction and probes need.
    """
    s = self.settings
    prepare = [ResampleToSpacing(s.spacing), NormalizeIntensity(s.intensity, s.ct_window)]
    on_device = train and s.augment == "device"
    if on_device:
      geometry = [CenterResize(s.canvas)]
    elif train:
      geometry = [RandomResizedCrop(s.image_size, scale=s.crop_scale), RandomFlip(s.flip_axes),
                  IntensityJitter(s.brightness, s.contrast)]
    else:
      geometry = [CenterResize(s.image_size)]
    finish = [ToImagingExample(s.channels, s.canvas if on_device else s.image_size)]
    if mask:
      finish.append(MaskPatches(s.num_patches, s.mask_ratio))
    if on_device:
      finish.append(AugmentSeed())
    return prepare + geometry + finish + [KeyByModality(self.name)]

  def device_transform(self) -> DeviceAugment | None:
    """What the train step applies to each training batch first (`augment="device"`), or None."""
    s = self.settings
    if s.augment != "device":
      return None
    return DeviceAugment(self.name, s.image_size, s.crop_scale, s.flip_axes, s.brightness, s.contrast)

  def train_example_spec(self) -> dict:
    """A training example as the pipeline yields it: with `augment="device"` the canvas-size
    image and its augmentation seed, which `device_transform` turns into `example_spec()`'s."""
    s, spec = self.settings, self.example_spec()
    if s.augment != "device":
      return spec
    example = {**spec[self.name], batch.IMAGE: (tuple(s.canvas) + (s.channels,), np.float32),
               AUGMENT_SEED: ((), np.uint32)}
    return {self.name: example}

  def embedding_spec(self) -> dict:
    """The example spec without MAE masking (see `transforms(mask=False)`)."""
    s = self.settings
    return {self.name: batch.imaging_example_spec(s.image_size, s.channels, s.patch_size, None)}

  def example_spec(self) -> dict:
    s = self.settings
    return {self.name: batch.imaging_example_spec(s.image_size, s.channels, s.patch_size, s.mask_ratio)}

  def model_info(self) -> dict[str, dict[str, Any]]:
    s = self.settings
    return {self.name: {"image_shape": s.image_size, "channels": s.channels, "patch_shape": s.patch_size,
                        "num_patches": s.num_patches, "spatial_dims": s.spatial_dims}}

  def summary(self) -> dict[str, int]:
    """Counts for the logs: items per split, the source's stats and the patch layout."""
    s = self.settings
    out = {f"items_{split}": int(len(ids)) for split, ids in self.dataset.splits.items()}
    out.update({f"imaging_{k}": v for k, v in dict(getattr(self.dataset, "stats", {})).items()})
    out["labels"] = len(getattr(self.dataset, "label_names", ()))
    out["num_patches"] = s.num_patches
    out["visible_patches"] = batch.num_visible_patches(s.num_patches, s.mask_ratio)
    return out

  def labels(self, split: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """float32 [items, len(label_names)] of `split` in source order, and the label names.

    Reads no pixels when the source offers `labels` (an array or a method returning one);
    otherwise reads whole records.
    """
    names = tuple(getattr(self.dataset, "label_names", ()))
    source = self.source(split)
    values = getattr(source, "labels", None)  # an array attribute or a method
    values = values() if callable(values) else values
    if values is None:
      values = _stack_labels((source[i] for i in range(len(source))), len(names))
    values = np.asarray(values, dtype=np.float32)
    if values.shape != (len(source), len(names)):
      raise ValueError(f"ImagingData.labels({split!r}): labels have shape {values.shape}, "
                       f"expected ({len(source)}, {len(names)}) for label names {names}")
    return values, names


def _check_channels(settings: ImagingSettings, dataset_channels: int | None, path: Path) -> None:
  """Fails at start-up rather than at the first batch: ToImagingExample converts only 1 -> 3."""
  if dataset_channels is None or dataset_channels == settings.channels:
    return
  if not (dataset_channels == 1 and settings.channels == 3):
    raise ValueError(f"{_CONFIG_PREFIX}.channels is {settings.channels}, but the images in "
                     f"{path} have {dataset_channels} channel(s); only 1 -> 3 is converted "
                     f"(by repetition)")


def _stack_labels(records: Iterable[Mapping[str, Any]], num_labels: int) -> np.ndarray:
  rows = []
  for record in records:
    row = np.asarray(record.get("labels", np.zeros(0)), dtype=np.float32).reshape(-1)
    if row.shape != (num_labels,):
      raise ValueError(f"{record_name(record)}: 'labels' has {row.size} values, expected "
                       f"{num_labels}")
    rows.append(row)
  return np.stack(rows) if rows else np.zeros((0, num_labels), np.float32)


def _synthetic_images(cfg: Any, settings: ImagingSettings, artifacts_dir: Path) -> Path:
  """The synthetic images under artifacts_dir, written once (reused on resume)."""
  root = artifacts_dir / SYNTHETIC_DIRNAME
  # The source reads a folder through the manifest.csv in its root, labels included.
  if not (root / MANIFEST_FILENAME).exists():
    log.info("imaging: writing %d synthetic %dD images", cfg.synthetic_subjects,
             settings.spatial_dims)
    root.parent.mkdir(parents=True, exist_ok=True)
    write_synthetic_images(root, spatial_dims=settings.spatial_dims,
                           num_subjects=int(cfg.synthetic_subjects),
                           seed=int(cfg.synthetic_seed), image_size=max(settings.image_size))
  return root
