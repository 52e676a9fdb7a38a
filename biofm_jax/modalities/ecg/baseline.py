"""The raw-feature baseline for ECG probes: what a cardiologist's rhythm rules read.

Per record: heart rate and RR-interval irregularity from R peaks (mean RR, SD, RMSSD,
coefficient of variation, and the share of successive differences over 50 ms, the
features classical atrial-fibrillation detectors use), found on lead II (else the first
present lead); and each lead's SD and peak-to-peak amplitude. A logistic regression on
these sits beside the probe in record-label reports (`eval/record_tasks.py`).
"""
from __future__ import annotations

import numpy as np
import scipy.signal

_RR_FEATURES = 5


def rr_features(signal: np.ndarray, fs: float) -> np.ndarray:
  """[5] RR statistics of one lead (zeros when fewer than three beats are found)."""
  x = (signal - signal.mean()) / max(float(signal.std()), 1e-6)
  peaks, _ = scipy.signal.find_peaks(x, distance=max(int(0.25 * fs), 1), prominence=1.5)
  if len(peaks) < 3:
    return np.zeros(_RR_FEATURES)
  rr = np.diff(peaks) / fs
  diffs = np.diff(rr)
  return np.array([rr.mean(), rr.std(), np.sqrt(np.mean(diffs ** 2)), rr.std() / rr.mean(),
                   np.mean(np.abs(diffs) > 0.05)])


def record_features(record) -> np.ndarray:
  signal, present = np.asarray(record["signal"], np.float64), np.asarray(record["lead_present"], bool)
  lead = 1 if len(present) > 1 and present[1] else int(np.argmax(present))
  amplitude = np.concatenate([signal.std(axis=0), np.ptp(signal, axis=0)])
  return np.concatenate([rr_features(signal[:, lead], float(record["fs"])), amplitude])


def rhythm_features(train_source, source) -> np.ndarray:
  """[records, 5 + 2 * leads] features of every record of `source` (needs no training statistics)."""
  del train_source
  return np.stack([record_features(source[i]) for i in range(len(source))])
