"""Synthetic 12-lead ECGs in WFDB format with a planted rhythm label.

`write_synthetic_ecg(out, num_subjects, seed)` writes one 10-second record per subject
(`records/<id>.hea` + `.dat`, format 16, written by `wfdb.wrsamp` as PhysioNet's tools
write them) and `manifest.csv` (subject_id, path, afib). Subject ids are "1".."N", or
`subject_ids` (e.g. an EHR cohort's, so the two join by subject).

Rhythm: sinus beats (P wave, QRS, T wave) at a regular rate of 55-95 bpm with 3% RR
jitter, or atrial fibrillation (afib = 1, 30% of subjects): no P waves, irregular RR
intervals (log-normal, SD 0.25) at 80-130 bpm and a 5-7 Hz fibrillatory baseline. Each
lead sees the beat through its own gain (limb leads small, precordial R waves growing
from V1 to V4), plus baseline wander and noise. Sampling alternates between 100 and 125 Hz
by subject (resampling is exercised), and every seventh subject lacks V4-V6 (9 leads
written: lead masking is exercised). The cohort is written to a hidden sibling and renamed
into place; calling again returns the existing manifest.
"""
from __future__ import annotations

import csv
import os
import pathlib
from typing import Sequence

import numpy as np
import wfdb

from biofm_jax.data.sources.atomic import atomic_directory

LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_LEAD_GAIN = (0.6, 1.0, 0.5, -0.8, 0.3, 0.7, 0.4, 0.7, 1.0, 1.3, 1.1, 0.9)  # R-wave size per lead
_SECONDS, _RATES, _AFIB_SHARE, _MISSING_EVERY = 10.0, (100, 125), 0.3, 7
MANIFEST = "manifest.csv"


def _wave(t: np.ndarray, centre: float, width: float, height: float) -> np.ndarray:
  return height * np.exp(-0.5 * ((t - centre) / width) ** 2)


def _beat_times(rng: np.random.Generator, afib: bool) -> np.ndarray:
  rate = rng.uniform(80, 130) if afib else rng.uniform(55, 95)
  mean_rr = 60.0 / rate
  rr = mean_rr * (np.exp(rng.normal(0, 0.25, 64)) if afib else 1 + rng.normal(0, 0.03, 64))
  times = rng.uniform(0, mean_rr) + np.concatenate([[0.0], np.cumsum(np.clip(rr, 0.3, 2.0))])
  return times[times < _SECONDS]


def ecg_signal(rng: np.random.Generator, afib: bool, fs: int) -> np.ndarray:
  """[samples, 12] float mV of one subject's record."""
  t = np.arange(int(_SECONDS * fs)) / fs
  qrs, pt = np.zeros_like(t), np.zeros_like(t)
  for beat in _beat_times(rng, afib):
    qrs += _wave(t, beat - 0.04, 0.012, -0.12) + _wave(t, beat, 0.014, 1.0) + _wave(t, beat + 0.04, 0.012, -0.25)
    pt += _wave(t, beat + 0.28, 0.05, 0.3) + (0.0 if afib else _wave(t, beat - 0.18, 0.03, 0.15))
  if afib:  # the fibrillatory baseline
    pt += 0.05 * np.sin(2 * np.pi * rng.uniform(5, 7) * t + rng.uniform(0, 2 * np.pi))
  gains = np.asarray(_LEAD_GAIN) * rng.uniform(0.8, 1.2, len(LEADS))
  wander = 0.1 * np.sin(2 * np.pi * rng.uniform(0.15, 0.4) * t + rng.uniform(0, 2 * np.pi))
  signal = qrs[:, None] * gains + pt[:, None] * np.sign(gains) * 0.5 + wander[:, None]
  return signal + rng.normal(0, 0.02, signal.shape)


def write_synthetic_ecg(out: str | os.PathLike, *, num_subjects: int = 200, seed: int = 0,
                        subject_ids: Sequence[str] | None = None) -> pathlib.Path:
  """The manifest of the cohort at `out` (written now unless it is there already)."""
  out = pathlib.Path(out)
  if (out / MANIFEST).exists():
    return out / MANIFEST
  ids = [str(s) for s in subject_ids] if subject_ids is not None else [str(i) for i in range(1, num_subjects + 1)]
  if len(ids) < 10 or len(set(ids)) != len(ids):
    raise ValueError(f"write_synthetic_ecg: {len(ids)} subjects ({len(set(ids))} distinct); expected at least 10 "
                     f"distinct")
  rng = np.random.default_rng(seed)
  with atomic_directory(out) as tmp:
    (tmp / "records").mkdir()
    rows = []
    for position, subject in enumerate(ids, start=1):
      afib = bool(rng.random() < _AFIB_SHARE)
      fs = _RATES[position % len(_RATES)]
      signal = ecg_signal(rng, afib, fs)
      leads = list(LEADS[:9]) if position % _MISSING_EVERY == 0 else list(LEADS)
      wfdb.wrsamp(subject, fs=fs, units=["mV"] * len(leads), sig_name=leads,
                  p_signal=signal[:, :len(leads)], fmt=["16"] * len(leads), write_dir=str(tmp / "records"))
      rows.append({"subject_id": str(subject), "path": f"records/{subject}.hea", "afib": int(afib)})
    with open(tmp / MANIFEST, "w", newline="") as f:
      writer = csv.DictWriter(f, fieldnames=["subject_id", "path", "afib"])
      writer.writeheader()
      writer.writerows(rows)
  return out / MANIFEST
