"""Tests of the expression modality: the AnnData source, gene vocabulary, tokenisation,
masking, the Grain pipeline and `OmicsData`, on .h5ad files the tests write themselves."""
from __future__ import annotations

import json
import pathlib
import pickle

import anndata
import ml_collections
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from biofm_jax.data import batch, pipeline
from biofm_jax.modalities.omics import data as omics
from biofm_jax.modalities.omics import anndata as anndata_source
from biofm_jax.modalities.omics import hvg
from biofm_jax.data.sources import splits as splits_lib
from biofm_jax.modalities.omics.synthetic import write_synthetic_anndata

NUM_SPECIAL = len(batch.SPECIAL_TOKENS)


def counts_matrix(num_cells=40, num_genes=12, seed=0):
  rng = np.random.default_rng(seed)
  counts = rng.poisson(rng.uniform(0.2, 6.0, size=num_genes), size=(num_cells, num_genes))
  counts = counts.astype(np.float32)
  counts[3] = 0  # a cell with no expressed gene
  counts[4, :] = 0
  counts[4, 2] = 5.0  # a cell with a single expressed gene
  return counts


def write_h5ad(path, x, *, genes=None, layers=None, obs_columns=None, var=None):
  num_cells, num_genes = x.shape
  obs = pd.DataFrame(obs_columns or {}, index=[f"cell{i}" for i in range(num_cells)])
  var = var if var is not None else pd.DataFrame(
      index=list(genes) if genes is not None else [f"G{j}" for j in range(num_genes)])
  adata = anndata.AnnData(X=x, obs=obs, var=var)
  for name, layer in (layers or {}).items():
    adata.layers[name] = layer
  adata.write_h5ad(path)
  return path


def labelled_obs(num_cells):
  types = pd.Categorical([["B", "T", "NK"][i % 3] if i != 5 else None for i in range(num_cells)],
                         categories=["B", "NK", "T"])
  split = np.array(["train"] * num_cells, dtype=object)
  split[-8:-4], split[-4:] = "tuning", "held_out"
  return {"cell_type": types, "n_genes": np.arange(num_cells, dtype=np.float64), "split": split}


@pytest.fixture(scope="module")
def counts():
  return counts_matrix()


@pytest.fixture(scope="module")
def sparse_file(tmp_path_factory, counts):
  path = tmp_path_factory.mktemp("omics") / "sparse.h5ad"
  # X holds log-normalised values; raw counts live in a layer, as in real atlases.
  return write_h5ad(path, sp.csr_matrix(np.log1p(counts)), layers={"counts": sp.csr_matrix(counts)},
                    obs_columns=labelled_obs(len(counts)))


def records_of(source):
  return [source[i] for i in range(len(source))]


# ================================================================ AnnData source
def test_dense_and_sparse_give_the_same_records(tmp_path, counts, sparse_file):
  dense_file = write_h5ad(tmp_path / "dense.h5ad", counts, obs_columns=labelled_obs(len(counts)))
  csc_file = write_h5ad(tmp_path / "csc.h5ad", sp.csc_matrix(counts),
                        obs_columns=labelled_obs(len(counts)))
  kwargs = dict(label_columns=("cell_type", "n_genes"))
  datasets = [anndata_source.ExpressionDataset(dense_file, **kwargs),
              anndata_source.ExpressionDataset(csc_file, **kwargs),
              anndata_source.ExpressionDataset(sparse_file, layer="counts", **kwargs)]
  expected = [i for i in range(len(counts)) if counts[i].any() and i < len(counts) - 8]
  for dataset in datasets:
    assert dataset.stats["cells"] == 40 and dataset.stats["genes"] == 12
    assert dataset.stats["empty_cells"] == 1 and dataset.stats["nonzeros"] == int((counts > 0).sum())
    assert dataset.gene_names == tuple(f"G{j}" for j in range(12))
    assert dataset.label_names == ("cell_type", "n_genes")
    assert dataset.label_categories == {"cell_type": ("B", "NK", "T")}
    source = dataset.source("train")
    assert source.rows.tolist() == expected  # the empty cell 3 is skipped
    for record, row in zip(records_of(source), expected):
      assert record["cell_id"] == f"cell{row}"
      assert record["genes"].dtype == np.int32 and record["counts"].dtype == np.float32
      np.testing.assert_array_equal(record["genes"], np.flatnonzero(counts[row]))
      np.testing.assert_array_equal(record["counts"], counts[row][counts[row] > 0])
      np.testing.assert_array_equal(record["labels"], source.labels[list(source.rows).index(row)])
    # Categorical codes index the category names; the cell with no type is NaN.
    labels = dataset.labels
    assert np.isnan(labels[5, 0]) and labels[0, 0] == 0 and labels[1, 0] == 2
    assert labels[7, 1] == 7.0
  assert len(datasets[0].source("tuning")) == 4 and datasets[0].stats["fallback_split"] == 0


def test_x_versus_layer(sparse_file, counts):
  x = anndata_source.ExpressionDataset(sparse_file).source("train")[0]
  raw = anndata_source.ExpressionDataset(sparse_file, layer="counts").source("train")[0]
  np.testing.assert_allclose(x["counts"], np.log1p(raw["counts"]), rtol=1e-6)
  assert x["labels"].shape == (0,)
  with pytest.raises(ValueError, match=r"sparse\.h5ad.*no expression matrix 'layers/spliced'.*counts"):
    anndata_source.ExpressionDataset(sparse_file, layer="spliced")


@pytest.mark.parametrize("bad_value", [-1.0, np.nan])
def test_negative_or_nan_value_names_file_cell_and_gene(tmp_path, counts, bad_value):
  bad = counts.copy()
  bad[7, 4] = bad_value
  path = write_h5ad(tmp_path / "bad.h5ad", sp.csr_matrix(bad))
  with pytest.raises(ValueError, match=r"bad\.h5ad: X has value .* in cell 'cell7' \(obs row 7\) "
                                       r"for gene 'G4'; expected finite, non-negative"):
    anndata_source.ExpressionDataset(path)


def test_gene_ids_duplicates_gene_column_and_missing_columns(tmp_path, counts):
  genes = [f"G{j}" for j in range(11)] + ["G3"]
  with pytest.warns(UserWarning, match="not unique"):
    path = write_h5ad(tmp_path / "dup.h5ad", counts, genes=genes)
  with pytest.raises(ValueError, match=r"dup\.h5ad: var_names has 1 duplicated gene id\(s\), e\.g\. 'G3'"):
    anndata_source.ExpressionDataset(path)
  var = pd.DataFrame({"ensembl": [f"ENSG{j:05d}" for j in range(12)]},
                     index=[f"sym{j}" for j in range(12)])
  path = write_h5ad(tmp_path / "ens.h5ad", counts, var=var)
  dataset = anndata_source.ExpressionDataset(path, gene_column="ensembl")
  assert dataset.gene_names[:2] == ("ENSG00000", "ENSG00001")
  with pytest.raises(ValueError, match=r"ens\.h5ad: var has no column 'symbol' \(gene_column\)"):
    anndata_source.ExpressionDataset(path, gene_column="symbol")
  with pytest.raises(ValueError, match=r"ens\.h5ad: obs has no column 'cell_type' \(label_columns\)"):
    anndata_source.ExpressionDataset(path, label_columns=("cell_type",))


def test_unreadable_or_missing_file_is_named(tmp_path):
  (tmp_path / "junk.h5ad").write_bytes(b"not hdf5")
  with pytest.raises(ValueError, match=r"junk\.h5ad: not a readable \.h5ad"):
    anndata_source.ExpressionDataset(tmp_path / "junk.h5ad")
  with pytest.raises(ValueError, match=r"absent\.h5ad: AnnData file not found"):
    anndata_source.ExpressionDataset(tmp_path / "absent.h5ad")


def test_hash_splits_without_a_split_column(tmp_path, counts):
  path = write_h5ad(tmp_path / "nosplit.h5ad", counts)
  dataset = anndata_source.ExpressionDataset(path, fallback_seed=3)
  assert dataset.stats["fallback_split"] == 1 and list(dataset.splits) == list(splits_lib.STANDARD_SPLITS)
  buckets = splits_lib.hash_split_buckets([f"cell{i}" for i in range(40)], seed=3)
  train = [i for i in range(40) if buckets[i] == 0 and i != 3]
  assert dataset.splits["train"].tolist() == train
  with pytest.raises(ValueError, match="unknown split 'test'"):
    dataset.source("test")


def test_backed_mode_matches_memory_and_pickles(sparse_file, tmp_path, counts):
  kwargs = dict(layer="counts", label_columns=("cell_type",))
  memory = anndata_source.ExpressionDataset(sparse_file, **kwargs)
  backed = anndata_source.ExpressionDataset(sparse_file, backed=True, **kwargs)
  assert backed.stats == {**memory.stats, "backed": 1}
  source = backed.source("train")
  source[0]  # opens the file in this process; pickling must not carry the handle
  for candidate in (source, pickle.loads(pickle.dumps(source))):
    for got, want in zip(records_of(candidate), records_of(memory.source("train"))):
      assert got["cell_id"] == want["cell_id"]
      for key in ("genes", "counts", "labels"):
        np.testing.assert_array_equal(got[key], want[key])
  dense = anndata_source.ExpressionDataset(write_h5ad(tmp_path / "d.h5ad", counts), backed=True)
  np.testing.assert_array_equal(dense.source("train")[0]["counts"], counts[0][counts[0] > 0])
  with pytest.raises(ValueError, match=r"c\.h5ad: X is stored as CSC.*backed=False"):
    anndata_source.ExpressionDataset(write_h5ad(tmp_path / "c.h5ad", sp.csc_matrix(counts)),
                                     backed=True)


# ================================================================ vocabulary
@pytest.fixture(scope="module")
def dataset(sparse_file):
  return anndata_source.ExpressionDataset(sparse_file, layer="counts", label_columns=("cell_type",))


def test_vocab_from_train_only_medians_and_json_round_trip(dataset, counts, tmp_path):
  vocab = omics.GeneVocab.build(dataset.source("train"), num_value_bins=5, normalize_total=100.0,
                                log1p=True)
  train = counts[dataset.splits["train"]].astype(np.float64)
  expressed = np.flatnonzero((train > 0).any(axis=0))
  assert vocab.genes == tuple(f"G{j}" for j in expressed)
  assert vocab.num_training_cells == len(train) and vocab.size == NUM_SPECIAL + len(expressed)
  normalised = np.log1p(train / train.sum(axis=1, keepdims=True) * 100.0)
  for j, median in zip(expressed, vocab.gene_medians):
    np.testing.assert_allclose(median, np.median(normalised[train[:, j] > 0, j]), rtol=1e-6)
  path = tmp_path / "gene_vocab.json"
  vocab.save(path)
  assert omics.GeneVocab.load(path) == vocab
  payload = json.loads(path.read_text())
  payload["format_version"] = 99
  path.write_text(json.dumps(payload))
  with pytest.raises(ValueError, match=r"gene vocabulary .*gene_vocab\.json: format_version 99"):
    omics.GeneVocab.load(path)


def test_panel_mapping_with_partial_overlap():
  vocab = omics.GeneVocab(genes=("A", "B", "C", "D"), gene_medians=(1.0, 2.0, 3.0, 4.0),
                          num_value_bins=3, normalize_total=None, log1p=False)
  other_panel = ["D", "X", "B", "Y", "Z"]
  assert vocab.map_panel(other_panel).tolist() == [NUM_SPECIAL + 3, batch.UNK_ID, NUM_SPECIAL + 1,
                                                   batch.UNK_ID, batch.UNK_ID]
  assert vocab.panel_overlap(other_panel) == 2 and vocab.panel_overlap(["X"]) == 0
  # A record of the other panel: its unknown genes are dropped, known ones keep their ids.
  tokenize = omics.TokenizeExpression(vocab, vocab.map_panel(other_panel), 8, "binned")
  out = tokenize.map({"genes": np.array([0, 1, 2, 4]), "counts": np.array([5.0, 9.0, 1.0, 3.0])})
  assert out[batch.TOKENS][:4].tolist() == [batch.CLS_ID, NUM_SPECIAL + 1, NUM_SPECIAL + 3, batch.PAD_ID]


# ================================================================ tokenisation
def test_normalisation_matches_numpy():
  counts = np.array([1.0, 3.0, 6.0], np.float32)
  np.testing.assert_allclose(omics.normalize_counts(counts, None, False), counts)
  np.testing.assert_allclose(omics.normalize_counts(counts, 1e4, False), counts / 10.0 * 1e4)
  np.testing.assert_allclose(omics.normalize_counts(counts, 1e4, True), np.log1p(counts / 10.0 * 1e4))
  np.testing.assert_allclose(omics.normalize_counts(counts, None, True), np.log1p(counts))


def random_cell(rng, num_genes=60, expressed=25):
  genes = np.sort(rng.choice(num_genes, size=expressed, replace=False)).astype(np.int32)
  return {"cell_id": "c", "genes": genes,
          "counts": rng.integers(1, 50, size=expressed).astype(np.float32)}


@pytest.fixture(scope="module")
def panel_vocab():
  rng = np.random.default_rng(1)
  return omics.GeneVocab(genes=tuple(f"G{j}" for j in range(60)),
                         gene_medians=tuple(rng.uniform(0.5, 3.0, 60).tolist()), num_value_bins=5,
                         normalize_total=1e4, log1p=True)


def test_binned_keeps_top_genes_with_per_cell_quantile_bins(panel_vocab):
  rng = np.random.default_rng(0)
  panel = panel_vocab.map_panel([f"G{j}" for j in range(60)])
  tokenize = omics.TokenizeExpression(panel_vocab, panel, 16, "binned", 1e4, True, 5)
  for _ in range(5):
    cell = random_cell(rng)
    out = tokenize.map(cell)
    batch.check_example(out, batch.token_sequence_spec(16, with_values=True, with_targets=False), "cell")
    values = np.log1p(cell["counts"] / cell["counts"].sum() * 1e4)
    tokens = NUM_SPECIAL + cell["genes"]
    top = np.lexsort((tokens, -values))[:15]
    expected = np.sort(tokens[top])
    assert out[batch.TOKENS][0] == batch.CLS_ID and out[batch.TOKEN_VALUE_BINS][0] == 0
    assert out[batch.TOKENS][1:].tolist() == expected.tolist()  # top 15, in gene order
    assert out[batch.TOKEN_MASK].all()
    edges = np.quantile(values, [0.2, 0.4, 0.6, 0.8])  # the cell's own quantiles, all genes
    bins = out[batch.TOKEN_VALUE_BINS][1:]
    kept_values = values[np.searchsorted(tokens, expected)]
    assert bins.min() >= 1 and bins.max() <= 5
    lo = 1 + np.searchsorted(edges, kept_values, side="left")
    hi = 1 + np.searchsorted(edges, kept_values, side="right")
    assert ((bins >= lo) & (bins <= hi)).all()
  short = tokenize.map({"genes": np.array([3, 7], np.int32), "counts": np.array([2.0, 8.0], np.float32)})
  assert short[batch.TOKENS][:4].tolist() == [batch.CLS_ID, NUM_SPECIAL + 3, NUM_SPECIAL + 7, batch.PAD_ID]
  assert short[batch.TOKEN_MASK].tolist() == [True] * 3 + [False] * 13
  assert short[batch.TOKEN_VALUE_BINS][1:3].tolist() == [1, 5] and not short[batch.TOKEN_VALUE_BINS][3:].any()


def test_quantile_bins_are_deterministic_for_ties():
  assert omics.quantile_bins(np.ones(7), 5).tolist() == [3] * 7
  assert omics.quantile_bins(np.arange(10.0), 5).tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_rank_order_is_argsort_of_value_over_median(panel_vocab):
  rng = np.random.default_rng(2)
  panel = panel_vocab.map_panel([f"G{j}" for j in range(60)])
  tokenize = omics.TokenizeExpression(panel_vocab, panel, 12, "rank", 1e4, True)
  cell = random_cell(rng)
  out = tokenize.map(cell)
  batch.check_example(out, batch.token_sequence_spec(12, with_values=False, with_targets=False), "cell")
  values = np.log1p(cell["counts"] / cell["counts"].sum() * 1e4)
  ratio = values / np.asarray(panel_vocab.gene_medians)[cell["genes"]]
  order = np.lexsort((cell["genes"], -ratio))[:11]
  assert out[batch.TOKENS].tolist() == [batch.CLS_ID] + (NUM_SPECIAL + cell["genes"][order]).tolist()
  with pytest.raises(ValueError, match="rank mode with normalize_total=None.*medians were computed"):
    omics.TokenizeExpression(panel_vocab, panel, 12, "rank", None, True)


# ================================================================ masking
def tokenized_cells(vocab, mode, num=20, max_len=24):
  rng = np.random.default_rng(3)
  panel = vocab.map_panel([f"G{j}" for j in range(60)])
  tokenize = omics.TokenizeExpression(vocab, panel, max_len, mode, 1e4, True)
  return [tokenize.map(random_cell(rng, expressed=int(rng.integers(1, 40)))) for _ in range(num)]


def test_binned_masking_hides_values_and_keeps_gene_tokens(panel_vocab):
  mask = omics.MaskExpression("binned", panel_vocab.size, mask_rate=0.3)
  for i, example in enumerate(tokenized_cells(panel_vocab, "binned")):
    out = mask.random_map(example, np.random.default_rng(i))
    batch.check_example(out, batch.token_sequence_spec(24, with_values=True, with_targets=True), "cell")
    selected = out[batch.TARGET_MASK]
    assert selected.any() and not selected[0] and not selected[~example[batch.TOKEN_MASK]].any()
    np.testing.assert_array_equal(out[batch.TOKENS], example[batch.TOKENS])
    np.testing.assert_array_equal(out[batch.TARGET_TOKENS], example[batch.TOKENS])
    np.testing.assert_array_equal(out[batch.TARGET_VALUE_BINS], example[batch.TOKEN_VALUE_BINS])
    assert (out[batch.TOKEN_VALUE_BINS][selected] == batch.NO_VALUE_BIN).all()
    assert (out[batch.TARGET_VALUE_BINS][selected] >= 1).all()
    np.testing.assert_array_equal(out[batch.TOKEN_VALUE_BINS][~selected],
                                  example[batch.TOKEN_VALUE_BINS][~selected])


def test_rank_masking_is_bert_style_and_deterministic(panel_vocab):
  mask = omics.MaskExpression("rank", panel_vocab.size, mask_rate=0.5)
  actions = {"mask": 0, "random": 0, "kept": 0}
  for i, example in enumerate(tokenized_cells(panel_vocab, "rank", num=40)):
    out = mask.random_map(example, np.random.default_rng(i))
    again = mask.random_map(example, np.random.default_rng(i))
    for key in out:
      np.testing.assert_array_equal(out[key], again[key])
    assert batch.TOKEN_VALUE_BINS not in out
    selected = out[batch.TARGET_MASK]
    assert selected.any() and not selected[0] and not selected[~example[batch.TOKEN_MASK]].any()
    np.testing.assert_array_equal(out[batch.TARGET_TOKENS], example[batch.TOKENS])
    np.testing.assert_array_equal(out[batch.TOKENS][~selected], example[batch.TOKENS][~selected])
    new = out[batch.TOKENS][selected]
    actions["mask"] += int((new == batch.MASK_ID).sum())
    actions["kept"] += int((new == example[batch.TOKENS][selected]).sum())
    actions["random"] += int(((new != batch.MASK_ID) & (new != example[batch.TOKENS][selected])).sum())
    assert (new >= NUM_SPECIAL).sum() + (new == batch.MASK_ID).sum() == len(new)
  total = sum(actions.values())
  assert 0.65 < actions["mask"] / total < 0.95 and actions["random"] > 0 and actions["kept"] > 0


# ================================================================ data module and pipeline
def omics_config(tmp_path, **overrides):
  cfg = dict(path="", backed=False, layer="", gene_column="", label_columns=("cell_type",),
             tokenization="binned", max_len=32, num_value_bins=8, normalize_total=1e4, log1p=True,
             mask_rate=0.15, synthetic_cells=120, synthetic_seed=0)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


@pytest.mark.parametrize("mode", ["binned", "rank"])
def test_from_config_on_the_synthetic_file(tmp_path, mode):
  cfg = omics_config(tmp_path, tokenization=mode)
  data = omics.OmicsData.from_config(cfg, targets="masked", artifacts_dir=tmp_path)
  assert (tmp_path / omics.SYNTHETIC_FILENAME).exists() and (tmp_path / omics.VOCAB_FILENAME).exists()
  assert data.name == "omics"
  assert data.model_info() == {"omics": {"vocab_size": data.vocab.size,
                                         "num_value_bins": 8 if mode == "binned" else 0, "max_len": 32,
                                         "prediction_slots": 24}}  # prediction_slots(32, 0.15)
  summary = data.summary()
  assert summary["cells_train"] == 96 and summary["panel_overlap"] == len(data.vocab.genes)
  assert summary["train_cells_truncated"] > 0  # 200 genes do not fit in 31 slots
  values, names = data.labels("tuning")
  assert names == ("cell_type",) and values.shape == (12, 1)
  assert data.dataset.label_categories["cell_type"] == ("type_0", "type_1", "type_2", "type_3")
  source = data.source("train")
  example = source[0]
  for transform in data.transforms(train=True):
    example = (transform.random_map(example, np.random.default_rng(0))
               if isinstance(transform, omics.MaskExpression) else transform.map(example))
  batch.check_example(example["omics"], data.example_spec()["omics"], "cell")
  embed_example = data.transforms(train=False, mask=False)[0].map(source[0])
  batch.check_example(embed_example, data.embedding_spec()["omics"], "cell")
  # A second open reuses the file and the vocabulary; a changed config is refused.
  assert omics.OmicsData.from_config(cfg, targets="masked", artifacts_dir=tmp_path).vocab == data.vocab
  with pytest.raises(ValueError, match=r"gene_vocab\.json: built with .* config\.data\.omics asks"):
    omics.OmicsData.from_config(omics_config(tmp_path, log1p=False), targets="masked",
                                artifacts_dir=tmp_path)
  with pytest.raises(ValueError, match=r"^OmicsData: cannot make 'next' targets; it makes \['masked'\]$"):
    omics.OmicsData.from_config(cfg, targets="next", artifacts_dir=tmp_path)


def test_vocabulary_coverage_is_reported_and_enforced_and_gene_ids_map_through_a_table(tmp_path, counts):
  write_synthetic_anndata(tmp_path / "synthetic_omics.h5ad", num_cells=50)
  own = omics.OmicsData.from_config(omics_config(tmp_path), targets="masked", artifacts_dir=tmp_path)
  assert own.summary()["vocab_gene_coverage"] > 0.9 and own.summary()["vocab_count_coverage"] > 0.99
  other = write_h5ad(tmp_path / "other.h5ad", counts)  # genes G0.. vs the vocabulary's GENE0001..
  config = lambda **kw: omics_config(tmp_path, path=str(other), label_columns=(), **kw)  # noqa: E731
  with pytest.raises(ValueError, match=r"other\.h5ad: the gene vocabulary \(\d+ genes\) knows 0 of its 12 genes, "
                                       r"0\.0% of its counts .* most expressed unknown: \['G"):
    omics.OmicsData.from_config(config(), targets="masked", artifacts_dir=tmp_path)
  # Another id system (as Ensembl ids against symbols): a table maps them onto the vocabulary's.
  table = tmp_path / "ids.csv"
  table.write_text("file_id,vocab_id\n" + "".join(f"G{j},GENE{j + 1:04d}\n" for j in range(12)))
  mapped = omics.OmicsData.from_config(config(gene_id_map=str(table)), targets="masked", artifacts_dir=tmp_path)
  assert mapped.panel_overlap == 12 and mapped.summary()["vocab_count_coverage"] == 1.0
  # Half the table: coverage is the share of counts whose genes are known, checked against the floor.
  totals = counts.sum(axis=0)
  table.write_text("file_id,vocab_id\n" + "".join(f"G{j},GENE{j + 1:04d}\n" for j in range(6)))
  share = totals[:6].sum() / totals.sum()
  partial = omics.OmicsData.from_config(config(gene_id_map=str(table), min_vocab_coverage=0.0),
                                        targets="masked", artifacts_dir=tmp_path)
  assert partial.summary()["vocab_count_coverage"] == pytest.approx(share, rel=1e-6)
  top = f"G{6 + int(np.argmax(totals[6:]))}"
  with pytest.raises(ValueError, match=rf"most expressed unknown: \['{top}'"):
    omics.OmicsData.from_config(config(gene_id_map=str(table), min_vocab_coverage=min(share + 0.01, 1.0)),
                                targets="masked", artifacts_dir=tmp_path)


def test_synthetic_file_is_deterministic(tmp_path):
  a = anndata.read_h5ad(write_synthetic_anndata(tmp_path / "a.h5ad", num_cells=50, seed=4))
  b = anndata.read_h5ad(write_synthetic_anndata(tmp_path / "b.h5ad", num_cells=50, seed=4))
  assert sp.issparse(a.X) and a.X.format == "csr" and a.var_names[0] == "GENE0001"
  assert (a.X != b.X).nnz == 0 and a.obs.equals(b.obs)
  assert a.obs["split"].value_counts()["train"] == 40 and not list(tmp_path.glob(".*"))
  library = np.asarray(a.X.sum(axis=1)).ravel()
  assert library.max() / library.min() > 2.5


def test_pipeline_end_to_end_with_resume(tmp_path):
  data = omics.OmicsData.from_config(omics_config(tmp_path, synthetic_cells=80, backed=True),
                                     targets="masked", artifacts_dir=tmp_path)
  options = dict(global_batch_size=8, seed=7, process_index=0, process_count=1)
  train = pipeline.make_train_dataset(data.source("train"), data.transforms(train=True), **options)
  iterator = pipeline.make_iterator(train)
  next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  resumed = pipeline.make_iterator(pipeline.make_train_dataset(
      data.source("train"), data.transforms(train=True), **options))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert got["omics"][batch.TOKENS].shape == (8, 32)
    for key in want["omics"]:
      np.testing.assert_array_equal(got["omics"][key], want["omics"][key])
  evaluation = pipeline.make_eval_dataset(data.source("tuning"), data.transforms(train=False),
                                          example_spec=data.example_spec(), **options)
  batches = list(pipeline.make_iterator(evaluation))
  real = np.concatenate([b["omics"][batch.TOKEN_MASK][:, 0] for b in batches])
  assert real.sum() == len(data.source("tuning")) and len(real) % 8 == 0


# ================================================================ highly-variable genes
def hvg_reference():
  """The committed matrix and scanpy's Seurat v3 result on it (tests/data/make_hvg_reference.py)."""
  ref = json.loads((pathlib.Path(__file__).parent / "data" / "hvg_seurat_v3_reference.json").read_text())
  matrix = sp.csr_matrix((np.asarray(ref["data"], np.float32), ref["indices"], ref["indptr"]),
                         shape=(ref["num_cells"], ref["num_genes"]))
  return ref, matrix


def test_seurat_v3_matches_scanpy_streaming_cells(tmp_path):
  ref, matrix = hvg_reference()
  split = np.array(["train"] * matrix.shape[0], dtype=object)
  path = write_h5ad(tmp_path / "hvg.h5ad", matrix, genes=[f"G{j:03d}" for j in range(matrix.shape[1])],
                    obs_columns={"split": split})
  source = anndata_source.ExpressionDataset(path, backed=True).source("train")
  stats = hvg.seurat_v3(source, matrix.shape[1])
  np.testing.assert_allclose(stats.means, ref["means"], rtol=1e-12)
  np.testing.assert_allclose(stats.variances, ref["variances"], rtol=1e-9)
  np.testing.assert_allclose(stats.variances_norm, ref["variances_norm"], rtol=1e-9)
  assert sorted(stats.top(ref["n_top_genes"]).tolist()) == ref["highly_variable"]
  # The clipping matters on this matrix: without it the outlier cells' genes would rank higher.
  assert stats.variances_norm.max() < (stats.variances / np.maximum(stats.means, 1e-12)).max()


def test_seurat_v3_refuses_normalised_values_and_too_few_cells():
  ref, matrix = hvg_reference()
  cells = [{"genes": matrix[i].indices, "counts": matrix[i].data / 3.0} for i in range(5)]
  with pytest.raises(ValueError, match=r"need raw counts.*config\.data\.omics\.layer"):
    hvg.seurat_v3(cells, matrix.shape[1])
  with pytest.raises(ValueError, match="at least 2 cells"):
    hvg.seurat_v3(cells[:1], matrix.shape[1])


def test_highly_variable_vocabulary_limits_the_genes_read_and_survives_resume(tmp_path):
  cfg = omics_config(tmp_path, highly_variable_genes=20, label_columns=())
  data = omics.OmicsData.from_config(cfg, targets="masked", artifacts_dir=tmp_path)
  chosen = data.vocab.highly_variable
  assert len(chosen) == 20 and set(chosen) <= set(data.vocab.genes)
  assert len(data.vocab.genes) > 20 and data.summary()["highly_variable_genes"] == 20
  # The same genes scanpy-style selection would pick from the training cells' raw counts.
  source = data.dataset.source("train")
  expected = hvg.seurat_v3(source, len(data.dataset.gene_names)).top(20)
  assert chosen == tuple(data.dataset.gene_names[g] for g in expected.tolist())
  # Tokens come only from the chosen genes; coverage still counts every vocabulary gene.
  allowed = {data.vocab.size - len(data.vocab.genes) + data.vocab.genes.index(g) for g in chosen}
  examples = [data.transforms(train=False, mask=False)[0].map(source[i]) for i in range(30)]
  tokens = np.concatenate([e[batch.TOKENS][e[batch.TOKEN_MASK]][1:] for e in examples])
  assert len(tokens) and set(tokens.tolist()) <= allowed
  assert data.summary()["vocab_count_coverage"] > 0.99
  # A resume reads the saved selection; another count is refused.
  again = omics.OmicsData.from_config(cfg, targets="masked", artifacts_dir=tmp_path)
  assert again.vocab.highly_variable == chosen
  with pytest.raises(ValueError, match="highly_variable_genes"):
    omics.OmicsData.from_config(omics_config(tmp_path, highly_variable_genes=10, label_columns=()),
                                targets="masked", artifacts_dir=tmp_path)
  with pytest.raises(ValueError, match=r"highly_variable_genes=100000, but only \d+ genes vary"):
    omics.OmicsData.from_config(omics_config(tmp_path / "more", highly_variable_genes=100_000, label_columns=()),
                                targets="masked", artifacts_dir=tmp_path / "more")


def test_seurat_v3_matches_scanpy_run_here_when_it_is_installed(tmp_path):
  sc = pytest.importorskip("scanpy")
  path = write_synthetic_anndata(tmp_path / "cells.h5ad", num_cells=300, seed=5)
  adata = anndata.read_h5ad(path)
  expected = sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=25, inplace=False)
  dataset = anndata_source.ExpressionDataset(path)
  every_cell = [dict(zip(("genes", "counts"), dataset._reader.row(i))) for i in range(len(dataset.cell_ids))]
  stats = hvg.seurat_v3(every_cell, len(dataset.gene_names))  # as scanpy sees them: every cell
  np.testing.assert_allclose(stats.variances_norm, expected["variances_norm"].to_numpy(), rtol=1e-6)
  assert set(stats.top(25).tolist()) == set(np.flatnonzero(expected["highly_variable"].to_numpy()).tolist())
