"""Feature tables a new user may hand over by mistake: a European CSV (";" between fields,
decimal commas), a header read as one column, a table without usable features, and an
all-categorical table (no numeric column) reaching the model and its checkpoint."""
from __future__ import annotations

import jax
import numpy as np
import pytest

from biofm_jax.config import load_config
from biofm_jax.data import batch as B
from biofm_jax.modalities.tabular import data as tabular
from biofm_jax.modalities.tabular.source import TabularDataset
from tests.test_tabular_data import EXPECTED_NUMERIC, HEADER, NUMERIC, ROWS, tabular_cfg, write_csv


def european(text: str) -> str:
  """The hand table as a European spreadsheet exports it: ';' between fields, ',' as decimal mark."""
  return text.replace(",", ";").replace(".", ",")


@pytest.fixture
def european_csv(tmp_path):
  return write_csv(tmp_path / "european.csv", header=european(HEADER), rows=[european(r) for r in ROWS])


def test_a_european_csv_is_an_error_naming_the_columns_and_the_setting_and_reads_with_it(european_csv):
  # diameter and texture hold "1,5"-style numbers; volume and const are whole numbers, read either way.
  with pytest.raises(ValueError, match=r"european.csv: columns \['diameter', 'texture'\] \(2 in all\) hold numbers "
                                       r"written with a comma .* set data.tabular.decimal=','"):
    TabularDataset(european_csv, label_columns=("malignant",))
  dataset = TabularDataset(european_csv, label_columns=("malignant",), decimal=",")
  assert dataset.numeric_columns == NUMERIC and dataset.categorical_columns == ("vendor", "site")
  rows = np.concatenate([dataset.splits[s] for s in ("train", "tuning", "held_out")])
  np.testing.assert_array_equal(dataset._numeric[np.argsort(rows)], EXPECTED_NUMERIC)
  assert dataset.stats["non_numeric_cells"] == 2  # "n/a" and "?", as in the comma-separated original


def test_explicit_categorical_columns_name_the_comma_columns_too(european_csv):
  with pytest.raises(ValueError, match=r"columns \['diameter', 'texture'\] .* data.tabular.decimal=','"):
    TabularDataset(european_csv, label_columns=("malignant",), categorical_columns=("vendor", "site"))


def test_decimal_comma_cells_holding_a_point_are_not_numbers_and_the_marks_must_differ(tmp_path):
  path = write_csv(tmp_path / "t.csv", header="subject_id;x;y", rows=["a;1,5;1", "b;2.5;2", "c;3,5;3"])
  dataset = TabularDataset(path, decimal=",")
  np.testing.assert_array_equal(dataset._numeric[:, 0], [1.5, np.nan, 3.5])  # "2.5" is not guessed at
  assert dataset.non_numeric_cells_by_column == {"x": 1}
  with pytest.raises(ValueError, match=r"data.tabular.decimal is ',' \(delimiter ','\); expected one of"):
    TabularDataset(path, delimiter=",", decimal=",")
  with pytest.raises(ValueError, match=r"data.tabular.decimal is ' '"):
    TabularDataset(path, decimal=" ")


def test_a_header_read_as_one_column_says_which_delimiter_to_set(european_csv):
  with pytest.raises(ValueError, match=r"european.csv, line 2: .*one column holding ';': set "
                                       r"data.tabular.delimiter=';'"):
    TabularDataset(european_csv, delimiter=",")
  one = write_csv(european_csv.with_name("one.csv"), header="subject_id;x", rows=["a", "b"])
  with pytest.raises(ValueError, match=r"no id column 'subject_id'.*set data.tabular.delimiter=';'"):
    TabularDataset(one, delimiter=",")


def test_a_table_without_usable_features_is_an_error_before_training(tmp_path):
  only_ids = write_csv(tmp_path / "ids.csv", header="subject_id,malignant,split", rows=["a,1,train", "b,0,train"])
  with pytest.raises(ValueError, match=r"ids.csv: no feature columns; its 3 column\(s\) \['subject_id', "
                                       r"'malignant', 'split'\] are all id, split, label or excluded"):
    TabularDataset(only_ids, label_columns=("malignant",))
  empty = write_csv(tmp_path / "empty.csv", header="subject_id,x,y", rows=["a,,", "b,,"])
  with pytest.raises(ValueError, match=r"empty.csv: every feature column \(2: \['x', 'y'\]\) is empty"):
    TabularDataset(empty)


def test_the_config_carries_the_decimal_mark_to_the_source(european_csv, tmp_path):
  assert load_config("configs/tabular_features.py:tiny").data.tabular.decimal == "."
  cfg = tabular_cfg(path=str(european_csv), label_columns=("malignant",), delimiter=";", decimal=",")
  data = tabular.TabularData.from_config(cfg, targets="masked_features", artifacts_dir=tmp_path / "artifacts")
  assert data.model_info()["tabular"]["num_numeric"] == len(NUMERIC)
  with pytest.raises(ValueError, match="data.tabular.decimal=','"):
    tabular.TabularData.from_config(tabular_cfg(path=str(european_csv), label_columns=("malignant",)),
                                    targets="masked_features", artifacts_dir=tmp_path / "other")


def test_an_all_categorical_table_builds_a_model_without_zero_size_parameters():
  from biofm_jax.config import base_config
  from biofm_jax.modalities import registry
  config = base_config()
  config.model.update(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32, position="none")
  config.objective = dict(name="masked_features", category_loss_weight=1.0)
  model = registry.build_model(config, {"tabular": {"num_numeric": 0, "num_categorical": 2, "num_categories": 5}})
  example = {B.VALID: np.ones(3, bool), B.TABULAR_VALUES: np.zeros((3, 0), np.float32),
             B.TABULAR_MISSING: np.zeros((3, 0), bool), B.TABULAR_CATEGORIES: np.array([[1, 2], [3, 4], [0, 1]],
                                                                                      np.int32)}
  variables = model.init(jax.random.key(0), {"tabular": example}, train=False)
  sizes = {jax.tree_util.keystr(path): leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(variables)}
  assert sizes and not [name for name, size in sizes.items() if size == 0]  # Orbax cannot save those
  outputs = model.apply(variables, {"tabular": example}, train=False)["tabular"]
  assert outputs["value_predictions"].shape == (3, 0) and outputs["category_logits"].shape[:2] == (3, 2)
