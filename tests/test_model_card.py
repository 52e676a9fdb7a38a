"""The model card's pure parts: data fingerprints and the limits its figures show."""
import shutil

from biofm_jax.eval.model_card import card_markdown, fingerprint, known_limits


def test_a_fingerprint_follows_contents_and_relative_names_not_where_the_folder_lies(tmp_path):
  data = tmp_path / "data"
  (data / "shard").mkdir(parents=True)
  (data / "shard" / "0.parquet").write_bytes(b"rows of patients")
  (data / "codes.csv").write_text("code\nA\n")
  first = fingerprint(data)
  assert first["files"] == 2 and first["bytes"] == 16 + 7 and "0.parquet" not in str(first)
  shutil.copytree(data, tmp_path / "elsewhere")
  assert fingerprint(tmp_path / "elsewhere") == first  # moving the folder keeps its fingerprint
  (data / "codes.csv").write_text("code\nB\n")
  assert fingerprint(data)["sha256"] != first["sha256"]  # one changed byte
  (data / "codes.csv").write_text("code\nA\n")
  (data / "codes.csv").rename(data / "other.csv")
  assert fingerprint(data)["sha256"] != first["sha256"]  # a renamed file
  (tmp_path / "secret").write_text("outside")
  (data / "link").symlink_to(tmp_path / "secret")
  assert fingerprint(data)["files"] == 2  # a link is not followed
  assert fingerprint(tmp_path / "gone") == {"files": 0, "bytes": 0, "sha256": "", "missing": True}


def test_the_limits_name_what_the_figures_show():
  perf = {"source": "evaluation report",
          "held_out": {"n": 60, "metrics": {"auroc": 0.70}, "intervals": {"auroc": [0.55, 0.83]},
                       "subgroups": {"sex": {"F": {"n": 30, "auroc": 0.60}, "M": {"n": 30, "auroc": 0.69}}}},
          "baselines": {"count_lr": {"held_out": {"auroc": 0.72}}, "probe": {"held_out": {"auroc": 0.65}}}}
  sources = {"data.ehr.path": {"path": "/data/meds", "files": 0, "bytes": 0, "sha256": "", "missing": True}}
  limits = known_limits("binary", perf, sources)
  assert limits == [
      "The held-out set has 60 rows: its auroc is uncertain (see the interval).",
      "The baseline count_lr scores auroc 0.720 on held-out rows, at or above the model's 0.700.",
      "Subgroup sex=F (30 rows): auroc 0.600 vs 0.700 overall.",
      "The data source data.ehr.path (/data/meds) was not found at export time: the card cannot fingerprint what "
      "the model was trained on."]
  card = {"intended_use": {"task": "t", "type": "binary", "label": "labels file l, column boolean_value",
                           "classes": [], "prediction_time_cut": "inclusive", "inputs": ["ehr"]},
          "training_data": {"sources": sources, "cohort": {"labelled_rows": {"held_out": 60}}},
          "performance": perf, "known_limits": limits, "configs": {"pretrained_run": "runs/p"}}
  markdown = card_markdown(card)
  assert "| auroc | 0.7 | 0.550 to 0.830 |" in markdown and "not found at export time |" in markdown
  assert "- Subgroups by sex: F (n=30): auroc 0.600; M (n=30): auroc 0.690" in markdown
