"""The raw-feature baseline for image probes: what classical radiomics and pixel models read.

Per image, after intensity normalisation by the image's own modality (`NormalizeIntensity`
"auto": CT in the default soft-tissue window, MR by percentiles, 8-bit by range; a fixed
recipe, not the run's `intensity` / `ct_window` settings): first-order statistics of the intensities (mean, SD,
percentiles, skewness, kurtosis, histogram entropy: IBSI's first-order family), gradient
magnitude statistics (a simple texture measure), and the image averaged down to 8 pixels
per axis (the low-resolution "raw pixels" baseline of MedMNIST-style benchmarks). A
logistic regression on these sits beside the probe in record-label reports
(`eval/record_tasks.py`): a foundation model's embedding should beat what intensity,
texture and coarse layout alone give.
"""
from __future__ import annotations

import numpy as np
import scipy.stats

from biofm_jax.modalities.imaging.transforms import CenterResize, NormalizeIntensity

THUMBNAIL = 8  # pixels per spatial axis of the downsampled image
PERCENTILES = (5, 25, 50, 75, 95)
HISTOGRAM_BINS = 32


def first_order(values: np.ndarray) -> np.ndarray:
  """Mean, SD, percentiles, skewness, kurtosis and histogram entropy of intensities in [-1, 1]."""
  histogram, _ = np.histogram(values, bins=HISTOGRAM_BINS, range=(-1.0, 1.0))
  p = histogram[histogram > 0] / max(histogram.sum(), 1)
  spread = float(values.std())
  shape = (scipy.stats.skew(values), scipy.stats.kurtosis(values)) if spread > 1e-6 else (0.0, 0.0)
  return np.array([values.mean(), spread, *np.percentile(values, PERCENTILES), *shape, -(p * np.log(p)).sum()])


def image_features(record) -> np.ndarray:
  """[first-order (10) + gradient (2) + thumbnail (8^d x C)] features of one source record."""
  normalised = NormalizeIntensity().map(record)
  image = np.asarray(normalised["image"], np.float32)  # [*spatial, C]
  spatial = image.ndim - 1
  grey = image.mean(-1).astype(np.float64)
  axes = [a for a in range(spatial) if grey.shape[a] > 1]  # np.gradient needs two samples along an axis
  gradients = np.gradient(grey, axis=axes) if axes else []
  gradients = [gradients] if len(axes) == 1 else list(gradients)
  magnitude = np.sqrt(sum(g ** 2 for g in gradients)) if gradients else np.zeros_like(grey)
  thumbnail = CenterResize((THUMBNAIL,) * spatial).map(normalised)["image"]
  return np.concatenate([first_order(image.reshape(-1).astype(np.float64)),
                         [magnitude.mean(), magnitude.std()], np.asarray(thumbnail, np.float64).reshape(-1)])


def intensity_features(train_source, source) -> np.ndarray:
  """[images, features] of every image of `source` (needs no training statistics)."""
  del train_source
  return np.stack([image_features(source[i]) for i in range(len(source))])
