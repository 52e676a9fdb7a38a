"""Stratification finds planted patient clusters, their outcome differences, and names bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import helpers
from biofm_jax.eval import stratify

RATES = (0.1, 0.5, 0.9)  # outcome rate of planted cluster 0, 1, 2
HAZARDS = (0.2, 1.0, 5.0)  # exponential survival rate per planted cluster
PER_CLUSTER, DIM = 100, 16


def write_embeddings(path, subject_ids, vectors, *, times=None, splits=None, fixed_size=True):
  flat = pa.array(np.asarray(vectors, np.float32).ravel(), pa.float32())
  embedding = (pa.FixedSizeListArray.from_arrays(flat, DIM) if fixed_size else
               pa.ListArray.from_arrays(pa.array(np.arange(len(subject_ids) + 1) * DIM, pa.int32()), flat))
  pq.write_table(pa.table({
      "subject_id": pa.array(subject_ids, pa.int64()),
      "prediction_time": pa.array(times if times is not None else [None] * len(subject_ids), pa.timestamp("us")),
      "split": pa.array(splits if splits is not None else ["held_out"] * len(subject_ids)),
      "embedding": embedding}), path)
  return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """300 patients in 3 Gaussian blobs whose outcome rate and survival differ; `sex` is unrelated."""
  rng = np.random.default_rng(0)
  planted = np.repeat(np.arange(3), PER_CLUSTER)
  centres = rng.normal(0, 2.5, (3, DIM))  # far enough apart to be found, not trivially
  vectors = centres[planted] + rng.normal(0, 1, (len(planted), DIM))
  # Exactly round(rate * n) positives per cluster, so the planted rates are the true ones.
  outcome = np.concatenate([rng.permutation(np.arange(PER_CLUSTER) < round(r * PER_CLUSTER)) for r in RATES])
  event_time = rng.exponential(1 / np.asarray(HAZARDS)[planted])
  censor_time = rng.exponential(3.0, len(planted))
  order = rng.permutation(len(planted))  # rows in no particular order
  subject_ids = 1000 + np.arange(len(planted))
  labels = pd.DataFrame({"subject_id": subject_ids, "planted": planted[order].astype(str),
                         "boolean_value": outcome[order], "time": np.minimum(event_time, censor_time)[order],
                         "event": (event_time <= censor_time)[order],
                         "sex": rng.choice(["F", "M"], len(planted)), "age": rng.normal(60, 10, len(planted))})
  directory = tmp_path_factory.mktemp("stratify")
  write_embeddings(directory / "embeddings.parquet", subject_ids, vectors[order])
  labels.sample(frac=1, random_state=1).to_parquet(directory / "labels.parquet", index=False)  # other row order
  return directory


def joined(cohort):
  keys, embeddings = stratify.read_embeddings(cohort / "embeddings.parquet")
  return keys, embeddings, stratify.join_on_subject(keys, pd.read_parquet(cohort / "labels.parquet"))


def test_finds_the_planted_clusters_and_what_separates_them(cohort):
  keys, embeddings, table = joined(cohort)
  labels, info = stratify.cluster(embeddings, seed=0)
  assert info["k"] == 3 and set(info["silhouette"]) == set(range(2, 9))
  assert max(info["silhouette"], key=info["silhouette"].get) == 3
  result = stratify.describe_clusters(labels, table, outcomes=["boolean_value"], covariates=["sex", "age"],
                                      survival=("time", "event"), reference="planted")
  assert result["reference"]["adjusted_rand"] > 0.9
  assert result["outcomes"]["boolean_value"]["kind"] == "binary"
  assert result["outcomes"]["boolean_value"]["p_value"] < 1e-6
  assert result["covariates"]["sex"]["p_value"] > 0.01 and result["covariates"]["age"]["p_value"] > 0.01
  assert result["covariates"]["age"]["test"] == "kruskal-wallis"
  assert result["survival"]["p_value"] < 1e-6
  for c in range(3):
    planted = int(table["planted"][labels == c].mode()[0])
    assert abs(result["outcomes"]["boolean_value"]["per_cluster"][str(c)]["rate"] - RATES[planted]) < 0.1
    proportions = result["covariates"]["sex"]["per_cluster"][str(c)]
    assert proportions["F"] + proportions["M"] == pytest.approx(1.0)
  medians = [result["survival"]["median"][str(c)] for c in range(3)]
  planted_of = [int(table["planted"][labels == c].mode()[0]) for c in range(3)]
  # Higher hazard, shorter median survival.
  assert [m for _, m in sorted(zip(planted_of, medians))] == sorted(medians, reverse=True)


def test_clustering_is_deterministic_with_the_seed(cohort):
  _, embeddings, _ = joined(cohort)
  first, info = stratify.cluster(embeddings, seed=3)
  again, info_again = stratify.cluster(embeddings, seed=3)
  np.testing.assert_array_equal(first, again)
  assert info["silhouette"] == info_again["silhouette"]
  fixed, fixed_info = stratify.cluster(embeddings, num_clusters=4, seed=3)
  assert fixed_info["k"] == 4 and fixed_info["chosen_by"] == "given" and len(np.unique(fixed)) == 4
  assert np.bincount(fixed).tolist() == sorted(np.bincount(fixed).tolist(), reverse=True)  # 0 is the largest


def test_join_on_subject_and_prediction_time(tmp_path):
  times = pd.to_datetime(["2020-01-01", "2021-06-01", "2020-01-01", "2021-06-01"]).to_numpy("datetime64[us]")
  path = write_embeddings(tmp_path / "e.parquet", [1, 1, 2, 2], np.zeros((4, DIM)), times=times,
                          splits=["train", "held_out", "train", "held_out"])
  keys, _ = stratify.read_embeddings(path)
  # Millisecond timestamps and int32 ids on the labels side still match; (2, 2021) has no label.
  table = pd.DataFrame({"subject_id": np.array([2, 1, 1], np.int32),
                        "prediction_time": pd.to_datetime(["2020-01-01", "2021-06-01", "2020-01-01"]).astype(
                            "datetime64[ms]"),
                        "float_value": [3.0, 2.0, 1.0], "split": ["x", "x", "x"]})
  result = stratify.join_on_subject(keys, table)
  assert result["float_value"].tolist()[:3] == [1.0, 2.0, 3.0] and np.isnan(result["float_value"][3])
  assert result.attrs["num_unmatched"] == 1
  assert result["split"].tolist() == ["train", "held_out", "train", "held_out"]  # the embeddings' own split
  held_out, vectors = stratify.select_split(keys, np.arange(4)[:, None], "held_out")
  assert held_out["subject_id"].tolist() == [1, 2] and vectors.ravel().tolist() == [1, 3]
  with pytest.raises(ValueError, match="no rows in split 'tuning'"):
    stratify.select_split(keys, np.zeros((4, 1)), "tuning")


def test_join_on_subject_alone_needs_one_row_per_subject(tmp_path):
  keys, _ = stratify.read_embeddings(write_embeddings(tmp_path / "e.parquet", [5, 6, 7], np.zeros((3, DIM))))
  table = pd.DataFrame({"subject_id": [7, 5, 9], "sex": ["F", "M", "F"], "boolean_value": [True, False, True],
                        "prediction_time": pd.to_datetime(["2020-01-01"] * 3)})
  result = stratify.join_on_subject(keys, table)  # the embeddings have no times: subject only
  assert result["sex"].tolist()[0::2] == ["M", "F"] and result["sex"].isna().tolist() == [False, True, False]
  assert result.attrs["num_unmatched"] == 1
  # An unmatched row is missing, not a third level or a False.
  described = stratify.describe_clusters([0, 0, 1], result, outcomes=["boolean_value"], covariates=["sex"])
  assert described["outcomes"]["boolean_value"]["kind"] == "binary"
  assert described["outcomes"]["boolean_value"]["missing"] == 1
  assert described["outcomes"]["boolean_value"]["per_cluster"] == {"0": {"rate": 0.0}, "1": {"rate": 1.0}}
  assert described["covariates"]["sex"]["per_cluster"]["1"] == {"F": 1.0, "M": 0.0}
  duplicated = pd.DataFrame({"subject_id": [5, 5, 6], "sex": ["F", "F", "M"]})
  with pytest.raises(ValueError, match=r"labels\.parquet: 2 rows share their subject_id.*subject_id=5"):
    stratify.join_on_subject(keys, duplicated, table_name="labels.parquet")


def test_bad_embedding_files_name_the_file_and_column(tmp_path):
  pq.write_table(pa.table({"subject_id": [1, 2], "vector": [[0.0], [1.0]]}), tmp_path / "no_embedding.parquet")
  with pytest.raises(ValueError, match=r"no_embedding\.parquet: no column 'embedding'"):
    stratify.read_embeddings(tmp_path / "no_embedding.parquet")
  pq.write_table(pa.table({"patient": [1, 2], "embedding": [[0.0], [1.0]]}), tmp_path / "no_subject.parquet")
  with pytest.raises(ValueError, match=r"no_subject\.parquet: no column 'subject_id'"):
    stratify.read_embeddings(tmp_path / "no_subject.parquet")
  pq.write_table(pa.table({"subject_id": [1, 2, 3], "embedding": [[0.0, 1.0], [1.0, 2.0], [1.0]]}),
                 tmp_path / "ragged.parquet")
  with pytest.raises(ValueError, match=r"ragged\.parquet: column 'embedding' has length 1 in row 2"):
    stratify.read_embeddings(tmp_path / "ragged.parquet")
  keys, vectors = stratify.read_embeddings(write_embeddings(tmp_path / "list.parquet", [1, 2], np.ones((2, DIM)),
                                                            fixed_size=False))
  assert vectors.shape == (2, DIM) and vectors.dtype == np.float32 and keys["subject_id"].tolist() == [1, 2]


def run_cli(*args):
  return subprocess.run([sys.executable, "experiments/stratify.py", *args], capture_output=True, text=True,
                        cwd=helpers.REPO, timeout=120)


def test_command_writes_the_report(cohort, tmp_path):
  out = tmp_path / "report"
  result = run_cli(f"--embeddings={cohort / 'embeddings.parquet'}", f"--labels={cohort / 'labels.parquet'}",
                   f"--out={out}", "--outcomes=boolean_value", "--covariates=sex,age", "--survival=time,event",
                   "--reference=planted", "--split=held_out")
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  assert "k = 3" in result.stdout and "boolean_value" in result.stdout and "logrank" in result.stdout
  for name in ("stratification.json", "stratification.md", "clusters.parquet", "clusters_pca.png",
               "km_by_cluster.png"):
    assert (out / name).stat().st_size > 0 and str(out / name) in result.stdout
  assert (out / "clusters_pca.png").read_bytes()[:4] == b"\x89PNG"
  report = json.loads((out / "stratification.json").read_text())
  assert report["clustering"]["k"] == 3 and report["num_unmatched"] == 0
  assert report["outcomes"]["boolean_value"]["p_value"] < 1e-6 and report["reference"]["adjusted_rand"] > 0.9
  assert "| outcomes | boolean_value | binary | chi-square |" in (out / "stratification.md").read_text()
  assert pd.read_parquet(out / "clusters.parquet")["cluster"].nunique() == 3
  assert not list(out.glob(".*tmp*"))  # no temporary files left behind


def test_command_names_a_missing_column(cohort, tmp_path):
  result = run_cli(f"--embeddings={cohort / 'embeddings.parquet'}", f"--labels={cohort / 'labels.parquet'}",
                   f"--out={tmp_path / 'report'}", "--outcomes=boolean_value,mortality")
  assert result.returncode == 2
  assert f"error: no column 'mortality' in {cohort / 'labels.parquet'}" in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "report").exists()
