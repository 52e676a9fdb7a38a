"""Expression from a TileDB-SOMA experiment: the same records as the .h5ad it was written
from, read by blocks, in block-buffered order while training."""
from __future__ import annotations

import anndata
import grain
import ml_collections
import numpy as np
import pytest

tiledbsoma_io = pytest.importorskip("tiledbsoma.io")

from biofm_jax.data import pipeline  # noqa: E402
from biofm_jax.modalities.omics import data as omics  # noqa: E402
from biofm_jax.modalities.omics import soma  # noqa: E402
from biofm_jax.modalities.omics.anndata import ExpressionDataset  # noqa: E402
from biofm_jax.modalities.omics.synthetic import write_synthetic_anndata  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The same cells as an .h5ad file and as a SOMA experiment written from it."""
  root = tmp_path_factory.mktemp("soma")
  h5ad = write_synthetic_anndata(root / "cells.h5ad", num_cells=700, seed=2)
  tiledbsoma_io.from_anndata(str(root / "experiment"), anndata.read_h5ad(h5ad), measurement_name="RNA")
  return h5ad, root / "experiment"


def test_soma_records_equal_the_h5ad_records(files):
  h5ad, experiment = files
  assert soma.is_soma_experiment(experiment) and not soma.is_soma_experiment(h5ad)
  a = ExpressionDataset(h5ad, label_columns=("cell_type",))
  b = soma.SomaExpressionDataset(experiment, label_columns=("cell_type",))
  assert b.gene_names == a.gene_names and b.label_categories == a.label_categories
  assert {k: len(v) for k, v in b.splits.items()} == {k: len(v) for k, v in a.splits.items()}
  np.testing.assert_allclose(b.gene_totals, a.gene_totals, rtol=1e-6)
  assert {k: v for k, v in b.stats.items() if k != "backed"} == {k: v for k, v in a.stats.items() if k != "backed"}
  for split in a.splits:
    sa, sb = a.source(split), b.source(split)
    for i in range(0, len(sa), 7):
      ra, rb = sa[i], sb[i]
      assert ra["cell_id"] == rb["cell_id"] and (ra["genes"] == rb["genes"]).all()
      np.testing.assert_array_equal(ra["counts"], rb["counts"])
      np.testing.assert_array_equal(ra["labels"], rb["labels"])


def test_block_buffered_order_is_a_local_permutation_that_changes_every_epoch():
  order = pipeline.block_buffered_order(1000, 64, 3, seed=1, epoch=0)
  assert sorted(order.tolist()) == list(range(1000))
  for start in range(0, 1000, 3 * 64):  # each buffer's records come from at most 3 blocks
    assert len(np.unique(order[start: start + 3 * 64] // 64)) <= 3
  assert (order != pipeline.block_buffered_order(1000, 64, 3, seed=1, epoch=1)).any()
  assert (order == pipeline.block_buffered_order(1000, 64, 3, seed=1, epoch=0)).all()


def test_training_reads_every_cell_once_per_epoch_and_each_block_once(files, monkeypatch, tmp_path):
  monkeypatch.setattr(soma, "BLOCK_CELLS", 50)
  _, experiment = files
  cfg = ml_collections.ConfigDict(dict(
      path=str(experiment), backed=False, layer="", gene_column="", label_columns=("cell_type",),
      tokenization="binned", max_len=32, num_value_bins=8, normalize_total=1e4, log1p=True, mask_rate=0.15,
      synthetic_cells=10, synthetic_seed=0, shuffle_buffer_blocks=2))
  data = omics.OmicsData.from_config(cfg, targets="masked", artifacts_dir=tmp_path)
  assert isinstance(data.dataset, soma.SomaExpressionDataset) and data.summary()["vocab_genes"] > 0
  source = data.source("train")
  reader = data.dataset._reader
  seen = []
  number = {cell: i for i, cell in enumerate(data.dataset.cell_ids)}

  class Record(grain.transforms.Map):  # the cell id beside the tokens, to count what an epoch reads
    def map(self, record):
      return {"cell": np.int64(number[record["cell_id"]]), **omics.TokenizeExpression(
          data.vocab, data.read_map, 32, "binned", 1e4, True, 8).map(record)}
  monkeypatch.setattr(data, "transforms", lambda train, mask=True: [Record()])
  reader.blocks_read, reader._cache = 0, type(reader._cache)()
  iterator = pipeline.make_iterator(data.make_train_dataset(global_batch_size=1, seed=4))
  for _ in range(len(source)):
    seen.append(int(next(iterator)["cell"][0]))
  assert sorted(seen) == sorted(number[c] for c in source.cell_ids)
  blocks = len(np.unique(source.rows // 50))
  assert reader.blocks_read <= blocks  # each block of the experiment read once in the epoch
  assert seen != sorted(seen)  # and not in file order


def test_unreadable_experiments_and_missing_layers_are_named(files, tmp_path):
  _, experiment = files
  (tmp_path / "fake" / "obs").mkdir(parents=True)
  (tmp_path / "fake" / "ms").mkdir()
  with pytest.raises(ValueError, match="fake: not a readable TileDB-SOMA experiment"):
    soma.SomaExpressionDataset(tmp_path / "fake")
  with pytest.raises(ValueError, match=r"no measurement 'ATAC'; it has \['RNA'\]"):
    soma.SomaExpressionDataset(experiment, measurement="ATAC")
  with pytest.raises(ValueError, match=r"no X layer 'counts'; it has \['data'\] \(config.data.omics.layer\)"):
    soma.SomaExpressionDataset(experiment, layer="counts")
  with pytest.raises(ValueError, match=r"obs has no column\(s\) \['donor_age'\]"):
    soma.SomaExpressionDataset(experiment, label_columns=("donor_age",))
