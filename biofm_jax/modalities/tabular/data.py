"""The tabular modality's data module: feature statistics, transforms and `TabularData`.

This module owns how one row of a feature table (see `source.py`) becomes the
fixed-shape arrays named in `batch.py` (one token per column, FT-Transformer style):

* `TabularStats`: per numeric column the training mean and standard deviation, per
  categorical column its training categories, with ids into one shared category
  vocabulary; built once from the training split and saved as a JSON artifact beside the
  checkpoint, so a resumed run standardises exactly as before.
* `StandardizeRow`: a Grain `Map` from a record to TABULAR_VALUES/MISSING/CATEGORIES.
* `MaskFeatures`: a Grain `RandomMap` hiding present features for masked-feature
  reconstruction.
* `TabularData`: what the pipeline and training loop use (sources, transforms, specs).

  train and eval: StandardizeRow -> MaskFeatures (left out for embeddings)
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import grain
import numpy as np

from biofm_jax.data import artifacts, batch, object_state
from biofm_jax.data.module import MASKED_FEATURES, DataModuleDefaults, check_targets, KeyByModality
from biofm_jax.data.config_fields import config_field
from biofm_jax.modalities.tabular import synthetic as synthetic_tabular
from biofm_jax.modalities.tabular import source as tabular_source

TARGETS = (MASKED_FEATURES,)  # what its examples can carry for an objective (data/module.py)
STATS_FORMAT = "biofm_jax.tabular_stats"
STATS_FORMAT_VERSION = 1
_STATS_HEADER = {"format": STATS_FORMAT, "format_version": STATS_FORMAT_VERSION}
STATS_FILENAME = "tabular_stats.json"
SYNTHETIC_DIRNAME = "synthetic_tabular"
MISSING_CATEGORY_ID = 0  # missing or unseen: never a reconstruction target
_CONFIG_PREFIX = "config.data.tabular"
# A training std at or below this is a constant column: divide by 1, not by ~0.
_MIN_STD = 1e-12

log = logging.getLogger(__name__)


# ================================================================ statistics
@object_state.storable
@dataclasses.dataclass(frozen=True)
class TabularStats:
  """Training-split statistics of the features; category id 0 = missing or unseen."""
  numeric_columns: tuple[str, ...]
  means: tuple[float, ...]
  stds: tuple[float, ...]  # 1.0 for constant or all-missing training columns
  categorical_columns: tuple[str, ...]
  categories: tuple[tuple[str, ...], ...]  # per column, sorted, seen >= min_category_count
  min_category_count: int
  num_constant_columns: int = 0  # numeric training columns with std 0 (std set to 1)
  num_empty_columns: int = 0  # numeric training columns with no value (mean 0, std 1)
  num_rare_categories: int = 0  # distinct training categories below min_category_count

  @classmethod
  def build(cls, source_train: Any, min_category_count: int = 1) -> TabularStats:
    """From a `TabularSource` (its arrays) or any sequence of records of the training split."""
    if min_category_count < 1:
      raise ValueError(f"TabularStats.build: min_category_count {min_category_count} must be >= 1")
    numeric, categorical = _training_arrays(source_train)
    if not len(numeric):
      raise ValueError("TabularStats.build: the training split has no rows")
    # NaN-aware, column by column over the rows that have a value; a column without any
    # training value gets mean 0 and std 1, so its (missing) values standardise to 0.
    observed = ~np.isnan(numeric).all(axis=0)
    means, stds = np.zeros(numeric.shape[1]), np.ones(numeric.shape[1])
    if observed.any():
      means[observed] = np.nanmean(numeric[:, observed], axis=0)
      stds[observed] = np.nanstd(numeric[:, observed], axis=0)
    constant = observed & (stds <= _MIN_STD)
    stds[constant] = 1.0
    vocab, rare = [], 0
    for column in categorical.T:
      counts = collections.Counter(str(v) for v in column.tolist() if v is not None)
      vocab.append(tuple(sorted(v for v, n in counts.items() if n >= min_category_count)))
      rare += sum(n < min_category_count for n in counts.values())
    return cls(numeric_columns=tuple(source_train.numeric_columns),
               means=tuple(float(m) for m in means), stds=tuple(float(s) for s in stds),
               categorical_columns=tuple(source_train.categorical_columns),
               categories=tuple(vocab), min_category_count=int(min_category_count),
               num_constant_columns=int(constant.sum()),
               num_empty_columns=int((~observed).sum()), num_rare_categories=int(rare))

  @property
  def num_categories(self) -> int:
    """Size of the shared category vocabulary, id 0 included."""
    return 1 + sum(len(c) for c in self.categories)

  @functools.cached_property
  def _category_ids(self) -> tuple[dict[str, int], ...]:
    tables, next_id = [], MISSING_CATEGORY_ID + 1
    for values in self.categories:
      tables.append({v: next_id + i for i, v in enumerate(values)})
      next_id += len(values)
    return tuple(tables)

  def category_ids(self, cells: Sequence[Any]) -> np.ndarray:
    """int32 [C]: each column's id of its cell; 0 for None or an unseen category."""
    tables, unseen = self._category_ids, MISSING_CATEGORY_ID
    return np.fromiter((unseen if v is None else table.get(str(v), unseen)
                        for table, v in zip(tables, cells)), dtype=np.int32, count=len(tables))

  def check_columns(self, dataset: Any, where: str = "tabular stats") -> None:
    """Raises naming the columns when `dataset` has other feature columns than the stats."""
    problems = []
    for kind in ("numeric_columns", "categorical_columns"):
      saved, now = tuple(getattr(self, kind)), tuple(getattr(dataset, kind))
      if saved == now:
        continue
      gone, new = [c for c in saved if c not in now], [c for c in now if c not in saved]
      details = ([f"missing from the data {gone}"] if gone else []) + (
          [f"not in the stats {new}"] if new else [])
      problems.append(f"{kind.replace('_', ' ')}: "
                      f"{', '.join(details) or 'the same names in another order'}")
    if problems:
      raise ValueError(f"{where}: the data's feature columns differ from the saved statistics "
                       f"({'; '.join(problems)}); a resumed run must see the same columns "
                       "(use a new workdir for a new table)")

  def save(self, path: str | os.PathLike) -> None:
    """Writes human-readable JSON atomically (`data/artifacts.py`)."""
    artifacts.write_json(path, _STATS_HEADER, dataclasses.asdict(self))

  @classmethod
  def load(cls, path: str | os.PathLike) -> TabularStats:
    payload = artifacts.read_json(path, _STATS_HEADER, "tabular stats")
    try:
      stats = cls(
          numeric_columns=tuple(str(c) for c in payload["numeric_columns"]),
          means=tuple(float(m) for m in payload["means"]),
          stds=tuple(float(s) for s in payload["stds"]),
          categorical_columns=tuple(str(c) for c in payload["categorical_columns"]),
          categories=tuple(tuple(str(v) for v in c) for c in payload["categories"]),
          min_category_count=int(payload["min_category_count"]),
          num_constant_columns=int(payload.get("num_constant_columns", 0)),
          num_empty_columns=int(payload.get("num_empty_columns", 0)),
          num_rare_categories=int(payload.get("num_rare_categories", 0)))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(f"tabular stats {path}: missing or malformed field ({e!r})") from e
    f, c = len(stats.numeric_columns), len(stats.categorical_columns)
    if (len(stats.means), len(stats.stds), len(stats.categories)) != (f, f, c):
      raise ValueError(f"tabular stats {path}: {len(stats.means)} means, {len(stats.stds)} stds "
                       f"and {len(stats.categories)} category lists, expected {f}, {f} and {c}")
    if not all(np.isfinite(stats.means)) or not all(s > 0 for s in stats.stds):
      raise ValueError(f"tabular stats {path}: expected finite means and positive stds")
    return stats


def _training_arrays(source: Any) -> tuple[np.ndarray, np.ndarray]:
  """float64 [rows, F] and object [rows, C]: the source's arrays, else its records stacked."""
  numeric, categorical = getattr(source, "numeric", None), getattr(source, "categorical", None)
  if numeric is not None and categorical is not None:
    return np.asarray(numeric, np.float64), np.asarray(categorical, dtype=object)
  records = [source[i] for i in range(len(source))]
  rows = len(records)
  numeric = np.array([r["numeric"] for r in records], np.float64).reshape(
      rows, len(source.numeric_columns))
  # Filled row by row: np.array would guess the shape from the str/None cells.
  categorical = np.empty((rows, len(source.categorical_columns)), dtype=object)
  for i, record in enumerate(records):
    categorical[i, :] = list(record["categorical"])
  return numeric, categorical


# ================================================================ transforms
def _record_name(record: Mapping[str, Any]) -> str:
  return f"tabular record (subject_id {record.get('subject_id', '?')})"


class StandardizeRow(grain.transforms.Map):
  """Record -> VALID, TABULAR_VALUES, TABULAR_MISSING and TABULAR_CATEGORIES."""

  def __init__(self, stats: TabularStats):
    self.stats = stats
    self.means = np.asarray(stats.means, np.float64)
    self.stds = np.asarray(stats.stds, np.float64)

  def map(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    numeric = np.asarray(record["numeric"], np.float64).reshape(-1)
    cells = list(np.asarray(record["categorical"], dtype=object).reshape(-1))
    f, c = len(self.means), len(self.stats.categorical_columns)
    if numeric.shape != (f,) or len(cells) != c:
      raise ValueError(f"{_record_name(record)}: {numeric.size} numeric and {len(cells)} "
                       f"categorical values, expected {f} and {c} as in the stats")
    missing = ~np.isfinite(numeric)
    values = np.where(missing, 0.0, (np.where(missing, 0.0, numeric) - self.means) / self.stds)
    return {batch.VALID: np.asarray(True),
            batch.TABULAR_VALUES: values.astype(np.float32),
            batch.TABULAR_MISSING: missing,
            batch.TABULAR_CATEGORIES: self.stats.category_ids(cells)}


class MaskFeatures(grain.transforms.RandomMap):
  """Hides present features for reconstruction; adds the TABULAR_* mask and target fields.

  Each present numeric value and each known category (id != 0) is selected with
  probability `mask_rate`, at least one per row when any is present. Missing values and
  unseen categories are never targets: there is nothing to reconstruct.
  """

  def __init__(self, mask_rate: float = 0.3):
    if not 0.0 < mask_rate <= 1.0:
      raise ValueError(f"MaskFeatures: mask_rate {mask_rate} must be in (0, 1]")
    self.mask_rate = float(mask_rate)

  def random_map(self, example: Mapping[str, np.ndarray],
                 rng: np.random.Generator) -> dict[str, np.ndarray]:
    values, categories = example[batch.TABULAR_VALUES], example[batch.TABULAR_CATEGORIES]
    present = np.concatenate([~example[batch.TABULAR_MISSING],
                              categories != MISSING_CATEGORY_ID])
    # Fixed-size draws regardless of content, so the stream of numbers per index is stable.
    select_u, fallback_u = rng.random(len(present)), rng.random()
    selected = present & (select_u < self.mask_rate)
    candidates = np.flatnonzero(present)
    if len(candidates) and not selected.any():  # every row teaches something
      selected[candidates[int(fallback_u * len(candidates))]] = True
    value_mask, category_mask = selected[:len(values)], selected[len(values):]
    out = dict(example)
    out[batch.TABULAR_VALUES] = np.where(value_mask, 0.0, values).astype(np.float32)
    out[batch.TABULAR_CATEGORIES] = np.where(category_mask, MISSING_CATEGORY_ID,
                                             categories).astype(np.int32)
    out[batch.TABULAR_VALUE_MASK], out[batch.TABULAR_CATEGORY_MASK] = value_mask, category_mask
    out[batch.TABULAR_TARGET_VALUES] = np.asarray(values, np.float32).copy()
    out[batch.TABULAR_TARGET_CATEGORIES] = np.asarray(categories, np.int32).copy()
    return out


# ================================================================ data module
@object_state.storable
class TabularData(DataModuleDefaults):
  """A feature table as the pipeline and training loop see it."""
  name = "tabular"

  def __init__(self, dataset: Any, stats: TabularStats, *, mask_rate: float, targets: str):
    check_targets("TabularData", targets, TARGETS)
    _check_mask_rate(mask_rate)
    stats.check_columns(dataset)
    self.dataset, self.stats, self.mask_rate, self.targets = dataset, stats, mask_rate, targets

  @classmethod
  def from_config(cls, cfg: Any, *, targets: str,
                  artifacts_dir: str | os.PathLike) -> TabularData:
    """Opens the table named by `cfg` (= config.data.tabular); synthetic when path is ""."""
    check_targets("TabularData", targets, TARGETS)  # before any data is generated or read
    get = lambda name: _field(cfg, name)  # noqa: E731
    min_count, mask_rate = int(get("min_category_count")), float(get("mask_rate"))
    if min_count < 1:
      raise ValueError(f"{_CONFIG_PREFIX}.min_category_count is {min_count}, expected >= 1")
    _check_mask_rate(mask_rate)  # before any data is generated or read
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    labels = _names(get("label_columns"), "label_columns")
    if get("path"):
      path = Path(get("path"))
    else:
      path = _synthetic_table(artifacts_dir, int(get("synthetic_rows")), int(get("synthetic_seed")))
    categorical = _names(get("categorical_columns"), "categorical_columns")
    dataset = tabular_source.TabularDataset(
        path, id_column=str(get("id_column")), label_columns=labels,
        categorical_columns=categorical or None,  # () in a config means "auto"
        exclude_columns=_names(get("exclude_columns"), "exclude_columns"),
        delimiter=str(cfg.get("delimiter", "")), decimal=str(cfg.get("decimal", ".")))
    stats = _load_or_build_stats(dataset, artifacts_dir / STATS_FILENAME, min_count)
    return cls(dataset, stats, mask_rate=mask_rate, targets=targets)

  def source(self, split: str):
    return self.dataset.source(split)

  def transforms(self, train: bool, mask: bool = True) -> list:
    """The same for train and eval: eval masking is made repeatable by its fixed seed.

    `mask=False` leaves out the masking: every feature reaches the encoder, as embedding
    extraction and probes need.
    """
    del train
    masking = [MaskFeatures(self.mask_rate)] if mask else []
    return [StandardizeRow(self.stats), *masking, KeyByModality(self.name)]

  def example_spec(self) -> dict:
    return {self.name: batch.tabular_example_spec(*self._shape, with_targets=True)}

  def embedding_spec(self) -> dict:
    """The example spec without masking (see `transforms(mask=False)`)."""
    return {self.name: batch.tabular_example_spec(*self._shape, with_targets=False)}

  @property
  def _shape(self) -> tuple[int, int]:
    return len(self.stats.numeric_columns), len(self.stats.categorical_columns)

  def model_info(self) -> dict[str, dict[str, int]]:
    num_numeric, num_categorical = self._shape
    return {self.name: {"num_numeric": num_numeric, "num_categorical": num_categorical,
                        "num_categories": self.stats.num_categories}}

  def summary(self) -> dict[str, int]:
    """Counts for the logs: rows per split, the source's stats and the statistics'."""
    out = {f"rows_{split}": int(len(rows)) for split, rows in self.dataset.splits.items()}
    out.update({f"tabular_{k}": v for k, v in dict(getattr(self.dataset, "stats", {})).items()})
    out.update(self.model_info()[self.name])
    out["labels"] = len(self.dataset.label_columns)
    out["train_constant_columns"] = self.stats.num_constant_columns
    out["train_empty_columns"] = self.stats.num_empty_columns
    out["categories_below_min_count"] = self.stats.num_rare_categories
    return out

  def labels(self, split: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """float32 [rows, L] of `split` in source order (NaN = missing), and the label names."""
    source = self.source(split)
    return np.asarray(source.labels, np.float32), tuple(self.dataset.label_columns)


_field = functools.partial(config_field, prefix=_CONFIG_PREFIX)


def _check_mask_rate(mask_rate: float) -> None:
  if not 0.0 < mask_rate <= 1.0:
    raise ValueError(f"{_CONFIG_PREFIX}.mask_rate is {mask_rate!r}, expected in (0, 1]")


def _names(value: Any, name: str) -> tuple[str, ...]:
  """A tuple of column names; a bare string is an error (it is not a one-column tuple)."""
  if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
    raise ValueError(f"{_CONFIG_PREFIX}.{name} is {value!r}, expected a tuple of column names")
  return tuple(str(v) for v in value)


def _synthetic_table(artifacts_dir: Path, num_rows: int, seed: int) -> Path:
  """The synthetic table under artifacts_dir, written once (reused on resume)."""
  root = artifacts_dir / SYNTHETIC_DIRNAME
  # write_synthetic_table renames a finished folder into place: if it is there, it is whole.
  if not (root / synthetic_tabular.DATA_FILENAME).exists():
    log.info("tabular: writing a synthetic table of %d rows", num_rows)
    synthetic_tabular.write_synthetic_table(root, num_rows=num_rows, seed=seed)
  return root


def _load_or_build_stats(dataset: Any, path: Path, min_count: int) -> TabularStats:
  """A resumed run must standardise with the exact statistics it was trained with."""
  if path.exists():
    stats = TabularStats.load(path)
    if stats.min_category_count != min_count:
      raise ValueError(f"tabular stats {path}: built with min_category_count="
                       f"{stats.min_category_count}, but the config asks for {min_count}; use "
                       "a new workdir or match the config")
    stats.check_columns(dataset, where=f"tabular stats {path}")
    log.info("tabular: loaded statistics of %d numeric and %d categorical columns",
             len(stats.numeric_columns), len(stats.categorical_columns))
    return stats
  stats = TabularStats.build(dataset.source("train"), min_count)
  stats.save(path)
  log.info("tabular: built statistics of %d numeric and %d categorical columns (%d constant, "
           "%d categories below min count)", len(stats.numeric_columns),
           len(stats.categorical_columns), stats.num_constant_columns, stats.num_rare_categories)
  return stats
