"""Tests of the synthetic multimodal cohort: every modality opens with its reader and data
module, ids and splits agree across modalities, missingness is as asked, writes are
deterministic and reused, and the planted latent is recoverable in and across modalities."""
from __future__ import annotations

import hashlib
import pathlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.linear_model import LogisticRegression, RidgeCV
from sklearn.model_selection import KFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from biofm_jax.modalities import registry
from biofm_jax.modalities import synthetic_cohort as mm
from biofm_jax.modalities.omics.anndata import ExpressionDataset
from biofm_jax.modalities.imaging.source import ImagingDataset
from biofm_jax.modalities.ehr.meds import MEDSDataset
from biofm_jax.modalities.tabular.source import TabularDataset

NUM_SUBJECTS, SEED = 200, 0
REPO = pathlib.Path(__file__).resolve().parent.parent
# Held-out (cross-validated) recovery of each latent from each modality's raw features:
# (risk: Pearson r, subtype: accuracy (chance 0.25), sex: accuracy). Measured at seed 0
# with 200 subjects: ehr .70/.88/.98, imaging .95/.81/1.0, omics .94/1.0/.99,
# tabular .82/.86/1.0; the floors leave room for library version drift.
FLOORS = {"ehr": (0.55, 0.7, 0.9), "imaging": (0.8, 0.65, 0.9), "omics": (0.8, 0.9, 0.9),
          "tabular": (0.7, 0.7, 0.9)}
RETRIEVAL_POOL, RETRIEVAL_K, RETRIEVAL_FLOOR = 60, 10, 0.45  # chance is 10/60 = 0.17


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  out = tmp_path_factory.mktemp("multimodal") / "cohort"
  return out, mm.write_synthetic_multimodal(out, num_subjects=NUM_SUBJECTS, seed=SEED)


@pytest.fixture(scope="module")
def latents(cohort):
  return pd.read_csv(cohort[0] / mm.LATENTS_FILENAME, dtype={"subject_id": str},
                     keep_default_na=False).set_index("subject_id")


@pytest.fixture(scope="module")
def datasets(cohort):
  paths = cohort[1]
  return {"ehr": MEDSDataset(paths["ehr"]),
          "imaging": ImagingDataset(paths["imaging"], spatial_dims=2),
          "omics": ExpressionDataset(paths["omics"], label_columns=("cell_type",)),
          "tabular": TabularDataset(paths["tabular"], label_columns=("malignant",))}


def records(dataset):
  """(split, record) of every record, split by split."""
  for split in dataset.splits:
    source = dataset.source(split)
    for i in range(len(source)):
      yield split, source[i]


def record_id(record) -> str:
  return str(record["cell_id"] if "cell_id" in record else record["subject_id"])


def split_of_subjects(dataset) -> dict[str, str]:
  """Subject id (as a string) -> the split the reader put it in."""
  return {record_id(r): split for split, r in records(dataset)}


# ---------------------------------------------------------------- raw features per modality
def ehr_features(recs) -> np.ndarray:
  """log(1 + 1000 x each code's share of the subject's rows)."""
  vocab = sorted({code for r in recs for code in r["codes"]})
  index = {code: j for j, code in enumerate(vocab)}
  counts = np.zeros((len(recs), len(vocab)))
  for i, r in enumerate(recs):
    np.add.at(counts[i], [index[c] for c in r["codes"]], 1.0)
  return np.log1p(1000.0 * counts / counts.sum(axis=1, keepdims=True))


def imaging_features(recs) -> np.ndarray:
  """Per image: the body's extent along each row and column, and its HU quantiles."""
  rows = []
  for r in recs:
    image = r["image"][..., 0]
    body = image > -500.0  # air is -1000 HU
    quantiles = np.quantile(image[body], np.linspace(0.05, 0.95, 19)) / 100.0
    rows.append(np.concatenate([body.mean(axis=0), body.mean(axis=1), quantiles]))
  return np.stack(rows)


def omics_features(recs, num_genes: int) -> np.ndarray:
  counts = np.zeros((len(recs), num_genes))
  for i, r in enumerate(recs):
    counts[i, r["genes"]] = r["counts"]
  return np.log1p(1e4 * counts / counts.sum(axis=1, keepdims=True))


def tabular_features(recs) -> np.ndarray:
  """Numeric columns with NaNs imputed by the median, categorical columns one-hot."""
  numeric = np.stack([r["numeric"] for r in recs])
  numeric = np.where(np.isnan(numeric), np.nanmedian(numeric, axis=0), numeric)
  categorical = np.stack([r["categorical"] for r in recs]).astype(str)
  one_hot = [(categorical[:, j:j + 1] == value).astype(float)
             for j in range(categorical.shape[1]) for value in np.unique(categorical[:, j])]
  return np.hstack([numeric, *one_hot])


@pytest.fixture(scope="module")
def predictions(datasets, latents) -> dict[str, pd.DataFrame]:
  """Per modality, cross-validated predictions of every latent from raw features."""
  out = {}
  for name, dataset in datasets.items():
    recs = [r for _, r in records(dataset)]
    features = {"ehr": ehr_features, "imaging": imaging_features, "tabular": tabular_features,
                "omics": lambda rs: omics_features(rs, len(dataset.gene_names))}[name](recs)
    truth = latents.loc[[record_id(r) for r in recs]]
    folds = KFold(5, shuffle=True, random_state=0)

    def classifier():
      return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    risk = cross_val_predict(make_pipeline(StandardScaler(), RidgeCV(np.logspace(-1, 4, 12))),
                             features, truth["risk"], cv=folds)
    subtype = cross_val_predict(classifier(), features, truth["subtype"], cv=folds,
                                method="predict_proba")
    female = cross_val_predict(classifier(), features, truth["female"], cv=folds,
                               method="predict_proba")[:, 1]
    program = cross_val_predict(make_pipeline(StandardScaler(), RidgeCV(np.logspace(-1, 4, 12))),
                                features, truth["program"], cv=folds)
    out[name] = pd.DataFrame({"risk": risk, "female": female, "program": program,
                              **{f"subtype_{k}": subtype[:, k] for k in range(mm.NUM_SUBTYPES)}},
                             index=truth.index)
  return out


# ---------------------------------------------------------------- structure
def test_every_modality_opens_and_shares_ids_and_splits(cohort, datasets, latents):
  out, paths = cohort
  assert set(paths) == set(mm.MODALITIES)
  for name, dataset in datasets.items():
    splits = split_of_subjects(dataset)
    expected = latents.index[latents[f"has_{name}"] == 1]
    assert sorted(splits) == sorted(expected), name
    assert all(splits[s] == latents.at[s, "split"] for s in splits), name
    assert set(dataset.splits) == {"train", "tuning", "held_out"}, name
    assert not dataset.stats["fallback_split"], name  # the written splits were used
  # MEDS: int64 ids; other modalities: their decimal strings (checked above via latents).
  for file in sorted((paths["ehr"] / "data").glob("*.parquet")):
    assert pq.read_schema(file).field("subject_id").type == pa.int64()
  assert all(int(s) >= 10_000 for s in latents.index)
  import anndata
  obs = anndata.read_h5ad(paths["omics"]).obs
  assert list(obs.index) == list(obs["subject_id"])
  assert set(obs["cell_type"].cat.categories) == {f"type_{k}" for k in range(4)}
  # The planted truth: 80/10/10 over all subjects, latents and labels as documented.
  assert latents["split"].value_counts().to_dict() == {"train": 160, "tuning": 20, "held_out": 20}
  assert abs(latents["risk"].mean()) < 0.2 and 0.8 < latents["risk"].std() < 1.2
  assert set(latents["subtype"]) == {0, 1, 2, 3}
  tabular = datasets["tabular"]
  labels = {r["subject_id"]: r["labels"][0] for _, r in records(tabular)}
  assert all(labels[s] == latents.at[s, "lesion"] for s in labels)  # malignant = lesion


def test_missing_fractions_are_as_asked_and_nobody_lacks_everything(latents):
  has = latents[[f"has_{name}" for name in mm.MODALITIES]].to_numpy()
  assert has.sum(axis=1).min() >= 1
  lacking = dict(zip(mm.MODALITIES, 1.0 - has.mean(axis=0)))
  print("share of subjects lacking each modality:", lacking)
  for name, fraction in mm.DEFAULT_MISSING.items():
    assert lacking[name] == pytest.approx(fraction, abs=0.01), name


def test_custom_missing_and_argument_errors(tmp_path):
  mm.write_synthetic_multimodal(tmp_path / "full", num_subjects=40, seed=1,
                                missing={"omics": 0.0, "imaging": 0.5})
  latents = pd.read_csv(tmp_path / "full" / mm.LATENTS_FILENAME)
  assert latents["has_omics"].all() and latents["has_imaging"].sum() == 20
  with pytest.raises(ValueError, match="missing"):
    mm.write_synthetic_multimodal(tmp_path / "bad", num_subjects=40, missing={"omics": 1.0})
  with pytest.raises(ValueError, match="missing"):
    mm.write_synthetic_multimodal(tmp_path / "bad", num_subjects=40, missing={"genome": 0.1})
  with pytest.raises(ValueError, match="num_subjects=5"):
    mm.write_synthetic_multimodal(tmp_path / "bad", num_subjects=5)
  assert not (tmp_path / "bad").exists()


def tree_digest(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_and_a_second_call_rewrites_nothing(cohort, tmp_path):
  out, paths = cohort
  again = tmp_path / "again"
  assert mm.write_synthetic_multimodal(again, num_subjects=NUM_SUBJECTS, seed=SEED) == \
      mm.cohort_paths(again)
  digest = tree_digest(out)
  assert tree_digest(again) == digest  # byte for byte, the .h5ad included
  assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left
  times = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
  assert mm.write_synthetic_multimodal(out, num_subjects=NUM_SUBJECTS, seed=SEED) == paths
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == times
  with pytest.raises(ValueError, match="written with"):
    mm.write_synthetic_multimodal(out, num_subjects=NUM_SUBJECTS, seed=SEED + 1)
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "notes.txt").write_text("not a cohort")
  with pytest.raises(ValueError, match="not an empty directory"):
    mm.write_synthetic_multimodal(tmp_path / "other", num_subjects=NUM_SUBJECTS, seed=SEED)
  other_seed = mm.write_synthetic_multimodal(tmp_path / "seed1", num_subjects=NUM_SUBJECTS,
                                             seed=SEED + 1)
  assert tree_digest(other_seed["imaging"].parent) != digest


def test_data_modules_open_the_cohort_with_the_tiny_configs(cohort, latents, tmp_path):
  from biofm_jax.config import load_config
  from biofm_jax.modalities.ehr import data as ehr
  from biofm_jax.modalities.imaging import data as imaging
  from biofm_jax.modalities.omics import data as omics
  from biofm_jax.modalities.tabular import data as tabular
  paths = cohort[1]
  specs = {"ehr": ("ehr_bert.py:tiny", ehr.EHRData),
           "imaging": ("imaging_mae.py:tiny", imaging.ImagingData),
           "omics": ("omics_expression.py:tiny", omics.OmicsData),
           "tabular": ("tabular_features.py:tiny", tabular.TabularData)}
  for name, (spec, cls) in specs.items():
    config = load_config(str(REPO / "configs" / spec), {f"data.{name}.path": str(paths[name])})
    data = registry.open_data_module(name, config.data[name], objective=config.objective.name,
                                     artifacts_dir=tmp_path / name)
    assert isinstance(data, cls), name
    train = latents[(latents[f"has_{name}"] == 1) & (latents["split"] == "train")]
    assert len(data.source("train")) == len(train), name
    example = data.source("train")[0]
    for transform in data.transforms(train=False, mask=False):
      example = transform.map(example)
    assert example, name


def test_cli_writes_a_3d_cohort(tmp_path, capsys):
  mm.main(["--out", str(tmp_path / "cli"), "--num_subjects", "30", "--seed", "2",
           "--spatial_dims", "3", "--image_size", "16", "--missing", "ehr=0,tabular=0.5"])
  assert "30 subjects" in capsys.readouterr().out
  latents = pd.read_csv(tmp_path / "cli" / mm.LATENTS_FILENAME)
  assert latents["has_ehr"].all() and latents["has_tabular"].sum() == 15
  dataset = ImagingDataset(tmp_path / "cli" / "imaging", spatial_dims=3)
  assert next(records(dataset))[1]["image"].shape == (16, 16, 16, 1)


# ---------------------------------------------------------------- the planted latent
@pytest.mark.parametrize("name", mm.MODALITIES)
def test_latent_is_recoverable_from_each_modality(name, predictions, latents):
  predicted = predictions[name]
  truth = latents.loc[predicted.index]
  risk_r = np.corrcoef(predicted["risk"], truth["risk"])[0, 1]
  subtype_columns = [f"subtype_{k}" for k in range(mm.NUM_SUBTYPES)]
  subtype_accuracy = np.mean(predicted[subtype_columns].to_numpy().argmax(axis=1)
                             == truth["subtype"].to_numpy())
  sex_accuracy = np.mean((predicted["female"] > 0.5) == truth["female"].astype(bool))
  print(f"{name}: {len(truth)} subjects, risk r={risk_r:.3f}, subtype accuracy="
        f"{subtype_accuracy:.3f}, sex accuracy={sex_accuracy:.3f}")
  floors = FLOORS[name]
  assert risk_r > floors[0] and subtype_accuracy > floors[1] and sex_accuracy > floors[2]


def test_the_tumour_program_shows_in_the_expression_profile_only(predictions, latents):
  """`aggressive` (a lesion whose tumour program is on) needs the image and the expression
  profile together: the program is read from the profile and from no other modality."""
  r = {name: np.corrcoef(p["program"], latents.loc[p.index, "program"])[0, 1] for name, p in predictions.items()}
  print("tumour program recovered (Pearson r):", {name: round(v, 3) for name, v in r.items()})
  # Seen at seed 0 with 200 subjects: omics 0.93; ehr -0.19, imaging -0.27, tabular 0.04
  # (cross-validated regression on features that carry nothing lands at or below 0).
  assert r["omics"] > 0.75 and all(v < 0.25 for name, v in r.items() if name != "omics"), r
  lesion, program = latents["lesion"].astype(bool), latents["program"].astype(float)
  assert latents["aggressive"].astype(bool).equals(lesion & (program > 0))
  assert 0.1 < latents["aggressive"].mean() < 0.4


def latent_embedding(predicted: pd.DataFrame) -> np.ndarray:
  """The predicted latent as a vector: standardised risk, subtype and sex probabilities."""
  subtype = predicted[[f"subtype_{k}" for k in range(mm.NUM_SUBTYPES)]].to_numpy()
  risk = (predicted["risk"] - predicted["risk"].mean()) / predicted["risk"].std()
  return np.column_stack([risk, 2.0 * subtype, 2.0 * predicted["female"]])


@pytest.mark.parametrize("target", ["imaging", "omics", "tabular"])
def test_oracle_retrieval_from_ehr_beats_chance(target, predictions):
  """Matching subjects by their predicted latents finds the same subject's other modality."""
  query_all, key_all = latent_embedding(predictions["ehr"]), latent_embedding(predictions[target])
  query_ids, key_ids = list(predictions["ehr"].index), list(predictions[target].index)
  common = [s for s in query_ids if s in set(key_ids)][:RETRIEVAL_POOL]
  query = query_all[[query_ids.index(s) for s in common]]
  key = key_all[[key_ids.index(s) for s in common]]
  distances = ((query[:, None, :] - key[None, :, :]) ** 2).sum(axis=-1)
  closer = (distances < np.diag(distances)[:, None]).sum(axis=1)  # rank of the true match
  recall = float(np.mean(closer < RETRIEVAL_K))
  chance = RETRIEVAL_K / len(common)
  print(f"ehr -> {target}: recall@{RETRIEVAL_K} {recall:.3f} among {len(common)} subjects "
        f"(chance {chance:.3f})")
  assert len(common) == RETRIEVAL_POOL and recall > RETRIEVAL_FLOOR
