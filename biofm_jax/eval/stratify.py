"""Patient stratification: clusters of embeddings and how they relate to outcomes and covariates.

Owns reading an embeddings parquet file (as written by experiments/embed.py), aligning a
labels/covariates table to its rows, clustering (standardise, PCA, KMeans with k picked by
silhouette), per-cluster summaries with tests of association, and the written report
(stratification.json, stratification.md, clusters.parquet and plots).
"""
from __future__ import annotations

import io
import json
import math
import pathlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from biofm_jax.eval.report import png_bytes, to_json_safe, write_atomic
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler
from sklearn.metrics import silhouette_score
from scipy.stats import chi2_contingency
from scipy.stats import kruskal
from lifelines import KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test
from matplotlib.figure import Figure
from sklearn.metrics import adjusted_rand_score

MAX_PCA_DIMS = 32
SILHOUETTE_ROWS = 2000  # silhouette is O(n^2); a seeded sample keeps k selection cheap
OUTPUT_FILES = ("stratification.json", "stratification.md", "clusters.parquet", "clusters_pca.png",
                "km_by_cluster.png")


def read_embeddings(path) -> tuple[pd.DataFrame, np.ndarray]:
  """(key columns: subject_id, prediction_time, split..., [N, D] float32 embeddings) of a parquet file."""
  path = pathlib.Path(path)
  table = pq.read_table(path)
  for name in ("subject_id", "embedding"):
    if name not in table.column_names:
      raise ValueError(f"{path}: no column {name!r} (it has {', '.join(table.column_names)})")
  if not pa.types.is_integer(table.schema.field("subject_id").type):
    raise ValueError(f"{path}: column 'subject_id' is {table.schema.field('subject_id').type}, not integers")
  column = table.column("embedding").combine_chunks()
  if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
          or pa.types.is_fixed_size_list(column.type)):
    raise ValueError(f"{path}: column 'embedding' is {column.type}, not a list of floats")
  if len(column) == 0:
    raise ValueError(f"{path}: no rows")
  if column.null_count:
    raise ValueError(f"{path}: column 'embedding' is null in row {_first(column.is_null())}")
  lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
  bad = np.flatnonzero(lengths != lengths[0])
  if bad.size:
    raise ValueError(f"{path}: column 'embedding' has length {lengths[bad[0]]} in row {bad[0]}, "
                     f"but {lengths[0]} in row 0")
  values = column.flatten()
  if values.null_count:
    raise ValueError(f"{path}: column 'embedding' has a null value in row {_first(values.is_null()) // lengths[0]}")
  embeddings = values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(column), int(lengths[0]))
  not_finite = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
  if not_finite.size:
    raise ValueError(f"{path}: column 'embedding' is not finite in row {not_finite[0]}")
  return table.drop_columns(["embedding"]).to_pandas(), embeddings


def _first(mask: pa.Array) -> int:
  return int(np.flatnonzero(mask.to_numpy(zero_copy_only=False))[0])


def read_outcome_table(path) -> pd.DataFrame:
  path = pathlib.Path(path)
  table = pd.read_parquet(path)
  if "subject_id" not in table.columns:
    raise ValueError(f"{path}: no column 'subject_id' (it has {', '.join(map(str, table.columns))})")
  return table


def select_split(keys: pd.DataFrame, embeddings: np.ndarray, split: str | None, *, source="embeddings"):
  """The rows of one split (all rows when `split` is None)."""
  if split is None:
    return keys, embeddings
  if "split" not in keys.columns:
    raise ValueError(f"{source}: no column 'split' to select split {split!r} from")
  chosen = (keys["split"] == split).to_numpy()
  if not chosen.any():
    raise ValueError(f"{source}: no rows in split {split!r} (splits: {', '.join(map(str, keys['split'].unique()))})")
  return keys[chosen].reset_index(drop=True), embeddings[chosen]


def _has_times(table: pd.DataFrame) -> bool:
  return "prediction_time" in table.columns and bool(table["prediction_time"].notna().any())


def _normalised_keys(table: pd.DataFrame, on: list[str], source: str) -> pd.DataFrame:
  # Both sides must agree on dtypes (int32 vs int64 ids, ms vs us timestamps) for the merge to match.
  table = table.copy()
  try:
    table["subject_id"] = table["subject_id"].astype("int64")
  except (ValueError, TypeError) as e:
    raise ValueError(f"{source}: column 'subject_id' must hold integers without nulls ({e})") from None
  if "prediction_time" in on:
    times = pd.to_datetime(table["prediction_time"])
    times = times.dt.tz_convert(None) if times.dt.tz is not None else times
    table["prediction_time"] = times.astype("datetime64[us]")
  return table


def join_on_subject(keys_df: pd.DataFrame, table_df: pd.DataFrame, *, table_name: str = "labels table"
                    ) -> pd.DataFrame:
  """`table_df`'s columns aligned to the embedding rows `keys_df` (NaN/None where unmatched).

  Joined on (subject_id, prediction_time) when both sides have non-null prediction times,
  else on subject_id alone, which needs one table row per subject. The number of unmatched
  embedding rows is in `.attrs["num_unmatched"]`.
  """
  if "subject_id" not in table_df.columns:
    raise ValueError(f"{table_name}: no column 'subject_id'")
  on = ["subject_id", "prediction_time"] if _has_times(keys_df) and _has_times(table_df) else ["subject_id"]
  # The embedding file's own columns (split, an all-null prediction_time) win over the table's.
  right = table_df.drop(columns=[c for c in table_df.columns if c in keys_df.columns and c not in on])
  right = _normalised_keys(right, on, table_name)
  duplicated = right.duplicated(on, keep=False)
  if duplicated.any():
    example = ", ".join(f"{k}={v}" for k, v in right.loc[duplicated, on].iloc[0].items())
    how = ("subject_id and prediction_time" if len(on) == 2 else
           "subject_id (prediction_time is missing or null on one side, so the table needs one row per subject)")
    raise ValueError(f"{table_name}: {int(duplicated.sum())} rows share their {how}, e.g. {example}")
  merged = _normalised_keys(keys_df[on], on, "embeddings").merge(right, on=on, how="left", indicator=True)
  merged.index = keys_df.index
  joined = pd.concat([keys_df, merged.drop(columns=on + ["_merge"])], axis=1)
  joined.attrs["num_unmatched"] = int((merged["_merge"] == "left_only").sum())
  return joined


def cluster(embeddings: np.ndarray, *, num_clusters: int | None = None, k_range=(2, 8), seed: int = 0
            ) -> tuple[np.ndarray, dict]:
  """(labels [N], info): KMeans on standardised, PCA-reduced embeddings; k by silhouette if not given.

  `k_range` is inclusive. Clusters are renumbered by decreasing size, so cluster 0 is the largest.
  info: k, silhouette {k: score}, explained_variance, and `projection` [N, 2] for plotting.
  """
  x = np.asarray(embeddings, np.float64)
  n = len(x)
  candidates = [num_clusters] if num_clusters else list(range(k_range[0], min(k_range[1], n - 1) + 1))
  if not candidates or min(candidates) < 2 or max(candidates) >= n:
    raise ValueError(f"cannot make {num_clusters or k_range} clusters of {n} rows")
  pca = PCA(n_components=min(MAX_PCA_DIMS, n, x.shape[1]), random_state=seed)
  z = pca.fit_transform(StandardScaler().fit_transform(x))
  sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, SILHOUETTE_ROWS), replace=False))
  fits, silhouette = {}, {}
  for k in candidates:
    fits[k] = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(z).labels_
    silhouette[k] = _silhouette(z[sample], fits[k][sample])
  k = num_clusters or max(candidates, key=lambda k: -math.inf if math.isnan(silhouette[k]) else silhouette[k])
  projection = np.zeros((n, 2))
  projection[:, :min(2, z.shape[1])] = z[:, :2]
  info = {"k": int(k), "chosen_by": "given" if num_clusters else "silhouette", "silhouette": silhouette,
          "silhouette_rows": int(sample.size), "pca_dims": int(z.shape[1]),
          "explained_variance": {"total": float(pca.explained_variance_ratio_.sum()),
                                 "per_component": pca.explained_variance_ratio_.tolist()},
          "projection": projection}
  return _by_decreasing_size(fits[k]), info


def _silhouette(z: np.ndarray, labels: np.ndarray) -> float:
  return float(silhouette_score(z, labels)) if 2 <= len(np.unique(labels)) < len(labels) else math.nan


def _by_decreasing_size(labels: np.ndarray) -> np.ndarray:
  ids, counts = np.unique(labels, return_counts=True)
  order = ids[np.argsort(-counts, kind="stable")]
  return np.argsort(order)[np.searchsorted(ids, labels)].astype(np.int64)


def describe_clusters(cluster_labels, table: pd.DataFrame, *, outcomes: list[str], covariates: list[str],
                      survival: tuple[str, str] | None = None, reference: str | None = None) -> dict:
  """Per-cluster sizes and summaries of each column, with a test of association across clusters."""
  labels = np.asarray(cluster_labels)
  table = table.reset_index(drop=True)
  if len(labels) != len(table):
    raise ValueError(f"{len(labels)} cluster labels for {len(table)} table rows")
  require_columns(table, [*outcomes, *covariates, *(survival or ()), *([reference] if reference else [])])
  clusters = np.unique(labels)
  result = {"sizes": {str(c): int((labels == c).sum()) for c in clusters},
            "outcomes": {c: describe_column(labels, table[c], outcome=True) for c in outcomes},
            "covariates": {c: describe_column(labels, table[c], outcome=False) for c in covariates}}
  if survival:
    result["survival"] = describe_survival(labels, table[survival[0]], table[survival[1]])
  if reference:
    present = table[reference].notna().to_numpy()
    result["reference"] = {"column": reference, "rows": int(present.sum()), "adjusted_rand": float(
        adjusted_rand_score(table[reference][present].astype(str), labels[present]))}
  return result


def require_columns(table: pd.DataFrame, columns, source: str = "the labels table") -> None:
  missing = [c for c in columns if c not in table.columns]
  if missing:
    raise ValueError(f"no column {missing[0]!r} in {source} (it has {', '.join(map(str, table.columns))})")


def column_kind(values: pd.Series, *, outcome: bool) -> str:
  """'binary' (outcomes only: bool or 0/1), 'numeric' or 'categorical', from the non-null values."""
  inferred = pd.api.types.infer_dtype(values, skipna=True)
  if outcome and (inferred == "boolean" or (inferred in ("integer", "floating", "mixed-integer-float")
                                            and set(pd.unique(values.dropna())) <= {0, 1})):
    return "binary"
  return "numeric" if inferred in ("integer", "floating", "mixed-integer-float", "decimal") else "categorical"


def describe_column(labels: np.ndarray, values: pd.Series, *, outcome: bool) -> dict:
  present = values.notna().to_numpy()
  kind = column_kind(values, outcome=outcome)
  labels, values = labels[present], values[present].reset_index(drop=True)
  clusters = np.unique(labels)
  if kind == "numeric":
    numbers = values.astype(float).to_numpy()
    per_cluster = {str(c): {"mean": _mean(numbers[labels == c]), "std": _std(numbers[labels == c])} for c in clusters}
    test = _kruskal([numbers[labels == c] for c in clusters])
  else:
    levels = values.astype(bool) if kind == "binary" else values.astype(str)
    counts = pd.crosstab(labels, levels)
    if kind == "binary":
      per_cluster = {str(c): {"rate": _mean(levels[labels == c].to_numpy(float))} for c in clusters}
    else:
      per_cluster = {str(c): (row / row.sum()).to_dict() for c, row in counts.iterrows()}
    test = _chi_square(counts.to_numpy())
  return {"kind": kind, "rows": int(present.sum()), "missing": int((~present).sum()), "per_cluster": per_cluster,
          **test}


def _mean(x: np.ndarray) -> float:
  return float(x.mean()) if x.size else math.nan


def _std(x: np.ndarray) -> float:
  return float(x.std(ddof=1)) if x.size > 1 else math.nan


def _chi_square(counts: np.ndarray) -> dict:
  counts = counts[counts.sum(axis=1) > 0][:, counts.sum(axis=0) > 0]
  if min(counts.shape) < 2:  # one cluster or one level left: nothing to test
    return {"test": "chi-square", "statistic": math.nan, "p_value": math.nan}
  test = chi2_contingency(counts)
  return {"test": "chi-square", "statistic": float(test.statistic), "p_value": float(test.pvalue)}


def _kruskal(groups: list[np.ndarray]) -> dict:
  groups = [g for g in groups if g.size]
  try:
    statistic, p_value = kruskal(*groups) if len(groups) >= 2 else (math.nan, math.nan)
  except ValueError:  # all values identical
    statistic, p_value = math.nan, math.nan
  return {"test": "kruskal-wallis", "statistic": float(statistic), "p_value": float(p_value)}


def describe_survival(labels: np.ndarray, times: pd.Series, events: pd.Series) -> dict:
  """Log-rank test across clusters and the Kaplan-Meier median survival per cluster (None: not reached)."""
  t = pd.to_numeric(times, errors="coerce").to_numpy(float)
  present = ~np.isnan(t) & events.notna().to_numpy()
  if (t[present] < 0).any():
    raise ValueError(f"survival column {times.name!r} has negative times")
  t, e, labels = t[present], events[present].astype(float).to_numpy() > 0, labels[present]
  medians = {str(c): _finite(KaplanMeierFitter().fit(t[labels == c], e[labels == c]).median_survival_time_)
             for c in np.unique(labels)}
  p_value = multivariate_logrank_test(t, labels, e).p_value if len(medians) >= 2 else math.nan
  return {"time": times.name, "event": events.name, "test": "logrank", "rows": int(present.sum()),
          "events": int(e.sum()), "p_value": float(p_value), "median": medians}


def _finite(x) -> float | None:
  return float(x) if np.isfinite(x) else None


def stratify(keys: pd.DataFrame, embeddings: np.ndarray, table: pd.DataFrame, *, num_clusters: int | None = None,
             k_range=(2, 8), seed: int = 0, outcomes=(), covariates=(), survival=None, reference=None) -> dict:
  """Clusters `embeddings` and describes them against `table` (aligned to the rows, see join_on_subject)."""
  labels, info = cluster(embeddings, num_clusters=num_clusters, k_range=k_range, seed=seed)
  projection = info.pop("projection")
  described = describe_clusters(labels, table, outcomes=list(outcomes), covariates=list(covariates),
                                survival=tuple(survival) if survival else None, reference=reference)
  per_row = keys.reset_index(drop=True).assign(cluster=labels, pc1=projection[:, 0], pc2=projection[:, 1])
  if survival:
    per_row = per_row.assign(**{name: table[name].to_numpy() for name in survival})
  return {"num_rows": len(labels), "num_unmatched": table.attrs.get("num_unmatched"), "seed": seed,
          "clustering": info, **described, "per_row": per_row}


def write_stratification(out_dir, result: dict) -> pathlib.Path:
  """Writes stratification.json/.md, clusters.parquet and the plots to `out_dir`; returns `out_dir`."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  report = to_json_safe({k: v for k, v in result.items() if k != "per_row"})
  write_atomic(out / "stratification.json", (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
  write_atomic(out / "stratification.md", markdown_report(report).encode())
  per_row = result.get("per_row")
  if per_row is not None:
    buffer = io.BytesIO()
    per_row.to_parquet(buffer, index=False)
    write_atomic(out / "clusters.parquet", buffer.getvalue())
    write_atomic(out / "clusters_pca.png", png_bytes(_pca_figure(per_row)))
    if result.get("survival"):
      write_atomic(out / "km_by_cluster.png", png_bytes(_km_figure(per_row, result["survival"])))
  return out


def _md_table(header: list[str], rows: list[list]) -> str:
  cell = lambda v: "—" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]) + "\n"


def markdown_report(report: dict) -> str:
  """The JSON report as readable markdown tables."""
  clustering = report["clustering"]
  parts = [f"# Patient stratification\n\n{report['num_rows']} rows, {clustering['k']} clusters "
           f"({'given' if clustering['chosen_by'] == 'given' else 'k with the best silhouette'}), "
           f"seed {report['seed']}; PCA to {clustering['pca_dims']} dims explains "
           f"{100 * clustering['explained_variance']['total']:.0f}% of the variance; "
           f"{report.get('num_unmatched') or 0} rows had no labels.\n",
           _md_table(["k", "silhouette"], [[k, s] for k, s in clustering["silhouette"].items()]),
           "## Cluster sizes\n", _md_table(["cluster", "size"], [[c, n] for c, n in report["sizes"].items()])]
  tests = [[role, name, d["kind"], d["test"], d["p_value"]] for role in ("outcomes", "covariates")
           for name, d in report[role].items()]
  if report.get("survival"):
    s = report["survival"]
    tests.append(["survival", f"{s['time']} / {s['event']}", "time-to-event", s["test"], s["p_value"]])
  parts += ["## Association with clusters\n", _md_table(["role", "column", "kind", "test", "p-value"], tests)]
  for role in ("outcomes", "covariates"):
    for name, d in report[role].items():
      stats = sorted({key for v in d["per_cluster"].values() for key in v})
      parts += [f"### {name}\n", _md_table(["cluster", *stats],
                                           [[c, *(v.get(k, 0.0) for k in stats)] for c, v in d["per_cluster"].items()])]
  if report.get("survival"):
    parts += ["### median survival (— not reached)\n",
              _md_table(["cluster", "median"], [[c, m] for c, m in report["survival"]["median"].items()])]
  if report.get("reference"):
    r = report["reference"]
    parts.append(f"Adjusted Rand index vs `{r['column']}`: {r['adjusted_rand']:.3f} ({r['rows']} rows).\n")
  return "\n".join(parts)



def _pca_figure(per_row: pd.DataFrame):
  figure = Figure(figsize=(5.5, 4.5))
  axes = figure.subplots()
  for c, rows in per_row.groupby("cluster"):
    axes.scatter(rows["pc1"], rows["pc2"], s=8, alpha=0.7, label=f"cluster {c} ({len(rows)})")
  axes.set(xlabel="PC 1", ylabel="PC 2", title="Embeddings by cluster")
  axes.legend(fontsize="small", markerscale=2)
  return figure


def _km_figure(per_row: pd.DataFrame, survival: dict):
  figure = Figure(figsize=(5.5, 4.5))
  axes = figure.subplots()
  rows = per_row.dropna(subset=[survival["time"], survival["event"]])
  for c, group in rows.groupby("cluster"):
    fitted = KaplanMeierFitter(label=f"cluster {c} ({len(group)})").fit(
        group[survival["time"]].astype(float), group[survival["event"]].astype(float) > 0)
    fitted.plot_survival_function(ax=axes)
  axes.set(xlabel=survival["time"], ylabel="survival probability",
           title=f"Kaplan-Meier by cluster (logrank p = {survival['p_value']:.2g})")
  return figure
