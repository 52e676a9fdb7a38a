"""A synthetic radiomics-like feature table with planted structure, for tests and demos.

This module owns `write_synthetic_table`, which writes a folder that
`tabular.TabularDataset` reads (the folder or the file inside it):

  data.parquet   one row per lesion:
    subject_id     "T00000", "T00001", ...
    split          train / tuning / held_out, 80/10/10% of the rows (shuffled)
    malignant      0/1, the label (keep it out of the features: label_columns)
    scanner_vendor GE / Siemens / Philips / Canon: uninformative about the label, but it
                   shifts the first-order intensity features (a batch effect)
    body_site      lung / liver / kidney / breast: mildly informative (malignancy rates
                   55/40/30/35%)
    24 numeric features in three groups of 8: shape_*, firstorder_*, texture_*

Three latent factors drive the features: f_size (lesion size and irregularity, shifted by
+1.5 standard deviations in malignant rows), f_intensity and f_heterogeneity
(independent of the label). Each group loads mostly on one factor, so the columns form
three correlated clusters; texture also loads on f_size, so the label is spread over two
clusters. Volume, surface area, energy and two texture features are log-normal (heavy
right tails), kurtosis has Student-t noise. About 10% of the numeric cells are missing
(2-10% per column, 30% in four texture columns that some extraction settings do not
compute) and 5% of the categorical cells.

Deterministic given (num_rows, seed). Written to a hidden sibling folder and renamed into
place (atomic_directory), so a crash never leaves a half-written table.

CLI:
  python -m biofm_jax.modalities.tabular.synthetic --out /tmp/tab --num_rows 600 --seed 0
"""
from __future__ import annotations

import argparse
import os
import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biofm_jax.data.sources.atomic import atomic_directory
from biofm_jax.data.sources.splits import STANDARD_SPLITS
from biofm_jax.modalities.tabular import table_files

DATA_FILENAME = "data.parquet"
ID_COLUMN, LABEL_COLUMN = "subject_id", "malignant"
VENDORS = ("GE", "Siemens", "Philips", "Canon")
SITE_MALIGNANCY = {"lung": 0.55, "liver": 0.40, "kidney": 0.30, "breast": 0.35}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# name: (loadings on (f_size, f_intensity, f_heterogeneity), noise sd, scale, offset, log-normal)
FEATURES = {
    "shape_volume_mm3": ((1.0, 0.0, 0.1), 0.4, 1.0, 8.0, True),
    "shape_surface_area_mm2": ((0.9, 0.0, 0.2), 0.4, 0.8, 6.5, True),
    "shape_max_diameter_mm": ((0.9, 0.0, 0.1), 0.5, 6.0, 25.0, False),
    "shape_sphericity": ((-0.7, 0.0, -0.2), 0.6, 0.08, 0.75, False),
    "shape_elongation": ((-0.4, 0.0, 0.0), 0.8, 0.1, 0.7, False),
    "shape_flatness": ((-0.3, 0.0, 0.1), 0.9, 0.1, 0.5, False),
    "shape_compactness": ((-0.6, 0.0, -0.1), 0.6, 0.05, 0.4, False),
    "shape_surface_volume_ratio": ((-0.8, 0.0, 0.2), 0.5, 0.1, 0.6, False),
    "firstorder_mean_hu": ((0.1, 1.0, 0.0), 0.4, 25.0, 40.0, False),
    "firstorder_median_hu": ((0.1, 0.95, 0.0), 0.4, 25.0, 38.0, False),
    "firstorder_p90_hu": ((0.2, 0.9, 0.3), 0.5, 30.0, 90.0, False),
    "firstorder_std_hu": ((0.3, 0.2, 0.7), 0.6, 8.0, 30.0, False),
    "firstorder_skewness": ((0.0, -0.3, 0.5), 0.8, 0.4, 0.1, False),
    "firstorder_kurtosis": ((0.0, 0.0, 0.4), 0.9, 0.8, 3.5, False),  # t-distributed noise
    "firstorder_entropy": ((0.2, 0.1, 0.8), 0.5, 0.4, 4.0, False),
    "firstorder_energy": ((0.8, 0.4, 0.0), 0.5, 1.0, 14.0, True),
    "texture_glcm_contrast": ((0.4, 0.0, 0.9), 0.5, 0.6, 2.0, True),
    "texture_glcm_correlation": ((-0.2, 0.0, -0.8), 0.6, 0.1, 0.55, False),
    "texture_glcm_homogeneity": ((-0.3, 0.0, -0.9), 0.5, 0.06, 0.45, False),
    "texture_glcm_entropy": ((0.3, 0.1, 0.9), 0.5, 0.5, 6.0, False),
    "texture_glrlm_run_length_nonuniformity": ((0.6, 0.0, 0.5), 0.6, 0.7, 5.0, True),
    "texture_glszm_zone_entropy": ((0.4, 0.0, 0.8), 0.6, 0.4, 5.5, False),
    "texture_ngtdm_coarseness": ((-0.4, 0.0, -0.7), 0.7, 0.01, 0.03, False),
    "texture_gldm_dependence_variance": ((0.5, 0.0, 0.7), 0.6, 2.0, 8.0, False),
}
# Texture features that some extraction settings leave out: far more often missing.
OFTEN_MISSING = ("texture_glrlm_run_length_nonuniformity", "texture_glszm_zone_entropy",
                 "texture_ngtdm_coarseness", "texture_gldm_dependence_variance")
_SIZE_SHIFT_MALIGNANT = 1.5
_VENDOR_SHIFT_HU = {"GE": 0.0, "Siemens": 12.0, "Philips": -8.0, "Canon": 5.0}
_CATEGORICAL_MISSING_RATE = 0.05


def _splits(num_rows: int, rng: np.random.Generator) -> np.ndarray:
  """80/10/10% of the rows (tuning and held_out rounded down), in shuffled row order."""
  counts = np.floor(np.asarray(SPLIT_FRACTIONS) * num_rows).astype(int)
  counts[0] += num_rows - counts.sum()
  names = np.repeat(np.array(STANDARD_SPLITS, dtype=object), counts)
  return names[rng.permutation(num_rows)]


def _features(factors: np.ndarray, vendors: np.ndarray,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
  columns = {}
  for name, (loadings, noise_sd, scale, offset, log_normal) in FEATURES.items():
    if name == "firstorder_kurtosis":
      noise = rng.standard_t(3, size=len(factors)) * noise_sd
    else:
      noise = rng.normal(0.0, noise_sd, size=len(factors))
    z = factors @ np.asarray(loadings) + noise
    values = np.exp(offset + scale * z) if log_normal else offset + scale * z
    if name.startswith("firstorder_") and name.endswith("_hu"):
      values = values + np.vectorize(_VENDOR_SHIFT_HU.get)(vendors)
    columns[name] = values
  return columns


def _with_missing(values: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
  out = values.astype(np.float64).copy()
  out[rng.random(len(out)) < rate] = np.nan
  return out


def synthetic_table(num_rows: int = 600, seed: int = 0, *, malignant: np.ndarray | None = None,
                    factors: np.ndarray | None = None) -> pa.Table:
  """The table that `write_synthetic_table` writes, in memory.

  A caller may plant its own structure (modalities/synthetic_cohort.py): `malignant` (0/1
  [num_rows]) replaces the labels drawn from the site rates, and `factors` ([num_rows, 3]:
  f_size, f_intensity, f_heterogeneity) are used as given, without the malignant shift.
  """
  if num_rows < 10:
    raise ValueError(f"synthetic_table: num_rows {num_rows} must be >= 10 (every split "
                     "needs rows)")
  rng = np.random.default_rng(seed)
  sites = np.array(list(SITE_MALIGNANCY), dtype=object)[rng.integers(0, 4, num_rows)]
  vendors = np.array(VENDORS, dtype=object)[rng.integers(0, len(VENDORS), num_rows)]
  if malignant is None:
    malignant = rng.random(num_rows) < np.vectorize(SITE_MALIGNANCY.get)(sites)
  malignant = np.asarray(malignant).astype(np.int64)
  if factors is None:
    factors = rng.normal(size=(num_rows, 3))
    factors[:, 0] += _SIZE_SHIFT_MALIGNANT * malignant
  factors = np.asarray(factors, np.float64)
  features = _features(factors, vendors, rng)
  missing_rates = rng.uniform(0.02, 0.10, size=len(FEATURES))
  columns = {ID_COLUMN: [f"T{i:05d}" for i in range(num_rows)],
             "split": _splits(num_rows, rng).tolist(), LABEL_COLUMN: malignant}
  for rate, (name, values) in zip(missing_rates, features.items()):
    columns[name] = _with_missing(values, 0.3 if name in OFTEN_MISSING else rate, rng)
  for name, values in (("scanner_vendor", vendors), ("body_site", sites)):
    cells = values.tolist()
    for i in np.flatnonzero(rng.random(num_rows) < _CATEGORICAL_MISSING_RATE):
      cells[i] = None
    columns[name] = pa.array(cells, pa.string())
  return pa.table(columns)


def write_synthetic_table(out_dir: str | os.PathLike, *, num_rows: int = 600,
                          seed: int = 0) -> pathlib.Path:
  """Writes `out_dir`/data.parquet (out_dir absent or empty); returns `out_dir`."""
  out = pathlib.Path(out_dir)
  table = synthetic_table(num_rows, seed)
  with atomic_directory(out) as staging:
    table = table_files.declare_label_columns(table, [LABEL_COLUMN])
    pq.write_table(table, staging / DATA_FILENAME)
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_rows", type=int, default=600)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  path = write_synthetic_table(args.out, num_rows=args.num_rows, seed=args.seed)
  print(f"wrote {args.num_rows} rows to {path / DATA_FILENAME}")


if __name__ == "__main__":
  main()
