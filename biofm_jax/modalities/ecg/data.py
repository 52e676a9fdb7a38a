"""The ECG data module: WFDB records -> fixed-length, per-lead normalised waveforms with
MAE patch ids, as `{"ecg": example}`.

  train: ResampleECG -> NormalizeLeads -> RandomCropECG -> ToECGExample -> MaskPatches
  eval:  ResampleECG -> NormalizeLeads -> CenterCropECG -> ToECGExample -> MaskPatches

Every record is resampled to `sampling_rate` (polyphase, scipy), each present lead is
standardised over the record (mean 0, SD 1; a flat lead stays near 0), and a window of
`length` samples is cut (random in training, centred in evaluation; shorter records are
zero-padded). Tokens are per-lead patches of `patch_size` samples, numbered lead-major
(token = lead * patches_per_lead + patch), so the patch grid is (leads, patches per lead).
A token is present when its lead is in the record and it holds real samples; MAE
reconstructs the masked present tokens only.

Example fields (no batch axis): `signal` float32 [length, leads]; `token_present` bool
[leads * patches_per_lead]; `valid` bool [] (False for the eval pipeline's padding examples);
with MAE masking `visible_patches` int32 [V] and `masked_patches` int32 [M].
"""
from __future__ import annotations

import fractions
import functools
import logging
import math
import os
from pathlib import Path
from typing import Any, Mapping

import grain
import numpy as np
import scipy.signal

from biofm_jax.data import batch, object_state
from biofm_jax.data.config_fields import config_field, require
from biofm_jax.data.masking import MaskPatches
from biofm_jax.data.sources import read_skips
from biofm_jax.data.module import MASKED_PATCHES, DataModuleDefaults, check_targets, KeyByModality
from biofm_jax.modalities.ecg.source import ECGDataset
from biofm_jax.modalities.ecg.synthetic import write_synthetic_ecg

NAME = "ecg"
TARGETS = (MASKED_PATCHES,)  # what its examples can carry for an objective (data/module.py)
SYNTHETIC_DIRNAME = "synthetic_ecg"
# Fields of an ECG example (the MAE patch ids share the batch contract's names).
SIGNAL = "signal"
TOKEN_PRESENT = "token_present"
VALID = batch.VALID
VISIBLE, MASKED = batch.IMAGE_VISIBLE, batch.IMAGE_MASKED
_MIN_LEAD_SD = 1e-3  # mV: a flat lead is scaled by this, not by ~0

log = logging.getLogger(__name__)
_field = functools.partial(config_field, prefix="config.data.ecg")
_require = functools.partial(require, prefix="config.data.ecg")


# ================================================================ transforms
class ResampleECG(grain.transforms.Map):
  """Record -> the same record at `rate` Hz (polyphase resampling along time)."""

  def __init__(self, rate: float):
    self.rate = float(rate)

  def map(self, record: Mapping[str, Any]) -> dict:
    fs = float(record["fs"])
    if math.isclose(fs, self.rate):
      return dict(record)
    ratio = fractions.Fraction(self.rate / fs).limit_denominator(1000)
    signal = scipy.signal.resample_poly(record["signal"], ratio.numerator, ratio.denominator, axis=0)
    return {**record, "signal": signal.astype(np.float32), "fs": np.float32(self.rate)}


class NormalizeLeads(grain.transforms.Map):
  """Each present lead to mean 0, SD 1 over the record; absent leads stay 0."""

  def map(self, record: Mapping[str, Any]) -> dict:
    signal = np.asarray(record["signal"], np.float32)
    present = np.asarray(record["lead_present"], bool)
    mean, sd = signal.mean(axis=0), np.maximum(signal.std(axis=0), _MIN_LEAD_SD)
    return {**record, "signal": np.where(present, (signal - mean) / sd, 0.0).astype(np.float32)}


def crop(record: Mapping[str, Any], length: int, start: int) -> dict:
  """`length` samples from `start`, zero-padded at the end; `samples_real` marks real ones."""
  signal = np.asarray(record["signal"], np.float32)[start:start + length]
  real = len(signal)
  out = np.zeros((length, signal.shape[1]), np.float32)
  out[:real] = signal
  return {**record, "signal": out, "samples_real": np.arange(length) < real}


class RandomCropECG(grain.transforms.RandomMap):
  def __init__(self, length: int):
    self.length = int(length)

  def random_map(self, record: Mapping[str, Any], rng: np.random.Generator) -> dict:
    spare = max(len(record["signal"]) - self.length, 0)
    return crop(record, self.length, int(rng.integers(spare + 1)))


class CenterCropECG(grain.transforms.Map):
  def __init__(self, length: int):
    self.length = int(length)

  def map(self, record: Mapping[str, Any]) -> dict:
    return crop(record, self.length, max(len(record["signal"]) - self.length, 0) // 2)


class ToECGExample(grain.transforms.Map):
  """Cropped record -> the example fields (see the module docstring)."""

  def __init__(self, patch_size: int):
    self.patch_size = int(patch_size)

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    signal = np.asarray(record["signal"], np.float32)
    patch_real = record["samples_real"].reshape(-1, self.patch_size).any(axis=1)  # [patches per lead]
    present = np.asarray(record["lead_present"], bool)[:, None] & patch_real[None, :]
    return {SIGNAL: signal, TOKEN_PRESENT: present.reshape(-1), VALID: np.asarray(bool(record["readable"]))}


# ================================================================ settings
def example_spec(num_leads: int, length: int, patch_size: int,
                 mask_ratio: float | None) -> dict[str, tuple[tuple[int, ...], Any]]:
  tokens = num_leads * (length // patch_size)
  spec = {SIGNAL: ((length, num_leads), np.float32), TOKEN_PRESENT: ((tokens,), np.bool_), VALID: ((), np.bool_)}
  if mask_ratio is not None:
    visible = batch.num_visible_patches(tokens, mask_ratio)
    spec.update({VISIBLE: ((visible,), np.int32), MASKED: ((tokens - visible,), np.int32)})
  return spec


def settings_from_config(cfg: Any) -> dict[str, Any]:
  """The checked settings of `config.data.ecg`."""
  leads = tuple(str(lead) for lead in _field(cfg, "leads"))
  rate, length, patch = float(_field(cfg, "sampling_rate")), int(_field(cfg, "length")), int(_field(cfg, "patch_size"))
  mask_ratio, on_error = float(_field(cfg, "mask_ratio")), str(_field(cfg, "on_error"))
  _require(len(leads) > 0 and len(set(map(str.lower, leads))) == len(leads), "leads", leads,
           "distinct lead names, e.g. ('I', 'II', 'V1')")
  _require(rate > 0, "sampling_rate", rate, "a rate in Hz > 0")
  _require(patch > 0 and length >= patch and length % patch == 0, "length", length,
           f"a positive multiple of patch_size={patch}")
  _require(0.0 < mask_ratio < 1.0, "mask_ratio", mask_ratio, "a fraction in (0, 1)")
  _require(on_error in ("raise", "skip"), "on_error", on_error, "'raise' or 'skip'")
  return {"leads": leads, "sampling_rate": rate, "length": length, "patch_size": patch, "mask_ratio": mask_ratio,
          "on_error": on_error}


def sizing(cfg: Any, targets: str, vocab_size: int) -> ECGData:
  """The registry's `sizing`: an `ECGData` over no records, whose specs and model info come
  from the config alone (`train/aot.py`); the leads and window fix every shape."""
  del vocab_size
  return ECGData(None, settings_from_config(cfg), targets=targets)


def model_info(s: Mapping[str, Any]) -> dict[str, Any]:
  return {"num_leads": len(s["leads"]), "length": s["length"], "patch_size": s["patch_size"],
          "patches_per_lead": s["length"] // s["patch_size"]}


# ================================================================ the data module
@object_state.storable
class ECGData(DataModuleDefaults):
  """ECG records as the pipeline, the training loop and evaluation see them."""
  name = NAME

  def __init__(self, dataset: Any, settings: Mapping[str, Any], *, targets: str):
    check_targets("ECGData", targets, TARGETS)
    self.dataset, self.settings, self.targets = dataset, dict(settings), targets

  @classmethod
  def from_config(cls, cfg: Any, *, targets: str, artifacts_dir: str | os.PathLike) -> ECGData:
    check_targets("ECGData", targets, TARGETS)  # before any data is generated or read
    settings = settings_from_config(cfg)
    path = str(_field(cfg, "path")) or str(_synthetic_manifest(cfg, Path(artifacts_dir)))
    dataset = ECGDataset(path, leads=settings["leads"], on_error=settings["on_error"],
                         skip_file=read_skips.skip_file_for(artifacts_dir))
    return cls(dataset, settings, targets=targets)

  def source(self, split: str):
    return self.dataset.source(split)

  def transforms(self, train: bool, mask: bool = True) -> list:
    """Eval masking stays random but the pipeline seeds it per position: repeatable.
    `mask=False` leaves out the MAE masking (embeddings, probes)."""
    s = self.settings
    window = RandomCropECG(s["length"]) if train else CenterCropECG(s["length"])
    masking = [MaskPatches(self._num_tokens, s["mask_ratio"])] if mask else []
    return [ResampleECG(s["sampling_rate"]), NormalizeLeads(), window, ToECGExample(s["patch_size"]),
            *masking, KeyByModality(self.name)]

  @property
  def _num_tokens(self) -> int:
    info = model_info(self.settings)
    return info["num_leads"] * info["patches_per_lead"]

  def example_spec(self) -> dict:
    s = self.settings
    return {self.name: example_spec(len(s["leads"]), s["length"], s["patch_size"], s["mask_ratio"])}

  def embedding_spec(self) -> dict:
    s = self.settings
    return {self.name: example_spec(len(s["leads"]), s["length"], s["patch_size"], None)}

  def model_info(self) -> dict[str, dict[str, Any]]:
    return {self.name: model_info(self.settings)}

  def summary(self) -> dict[str, Any]:
    out: dict[str, Any] = {f"records_{split}": int(len(rows)) for split, rows in self.dataset.splits.items()}
    out.update({f"ecg_{k}": v for k, v in self.dataset.stats.items()})
    out.update(model_info(self.settings))
    out["labels"] = len(self.dataset.label_names)
    return out

  def labels(self, split: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """[records, label columns] float32 (NaN where missing) and the column names."""
    return self.source(split).labels, tuple(self.dataset.label_names)


def _synthetic_manifest(cfg: Any, artifacts_dir: Path) -> Path:
  """A synthetic cohort with a planted rhythm label, written once under artifacts_dir."""
  return write_synthetic_ecg(artifacts_dir / SYNTHETIC_DIRNAME, num_subjects=int(_field(cfg, "synthetic_subjects")),
                             seed=int(_field(cfg, "synthetic_seed")))
