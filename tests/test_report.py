"""Validation reports: report.json (nested and flat), report.md, report.html and PNG plots, written atomically."""
from __future__ import annotations

import json

import numpy as np
import pytest

from biofm_jax.eval import metrics as M
from biofm_jax.eval import report as R

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _split(task_type, targets, predictions, groups=None):
  body = {"n": len(predictions), "metrics": M.task_metrics(task_type, targets, predictions),
          "intervals": M.bootstrap_intervals(task_type, targets, predictions, num_samples=30)}
  if groups is not None:
    body["subgroups"] = M.subgroup_metrics(task_type, targets, predictions, groups)
  return body


def _binary_report():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 2, size=400)
  model = np.clip(label * 0.4 + rng.uniform(size=400) * 0.6, 0, 1)
  gbm = np.clip(label * 0.2 + rng.uniform(size=400) * 0.8, 0, 1)
  targets = {"label": label}
  sex = np.array(["F", "M"] * 200, dtype=object)
  report = {
      "task": {"name": "readmission_30d", "type": "binary", "cohort": "synthetic"},
      "model": {"name": "biofm", "checkpoint": "runs/x/ckpt", "embedding_dim": np.int64(64)},
      "splits": {"held_out": _split("binary", targets, model, {"sex": sex}),
                 "tuning": _split("binary", targets, model)},
      "baselines": {"count_codes_gbm": {"held_out": _split("binary", targets, gbm)},
                    "prevalence": {"held_out": {"metrics": {"auroc": float("nan"), "n": 400}}}},
      "few_shot": {"metric": "auroc", "k": [1, 2, 4, 8],
                   "methods": {"biofm": {"mean": np.array([0.6, 0.7, 0.75, 0.8]), "std": [0.1, 0.08, 0.05, 0.02]},
                               "count_codes_gbm": {"mean": [0.55, 0.6, 0.66, 0.7], "std": [0.1, 0.1, 0.06, 0.04]}}},
  }
  curves = {"biofm": M.curves("binary", targets, model), "count_codes_gbm": M.curves("binary", targets, gbm)}
  return report, curves


def test_binary_report_writes_json_markdown_html_and_plots(tmp_path):
  report, curves = _binary_report()
  out = R.write_report(tmp_path / "report", report, curves_by_method=curves)
  data = json.loads((out / "report.json").read_text())
  assert data["held_out"]["auroc"] == pytest.approx(report["splits"]["held_out"]["metrics"]["auroc"])
  assert data["tuning"]["brier"] == pytest.approx(report["splits"]["tuning"]["metrics"]["brier"])
  assert data["splits"]["held_out"]["intervals"]["auroc"][0] <= data["held_out"]["auroc"]
  assert data["baselines"]["prevalence"]["held_out"]["metrics"]["auroc"] is None  # NaN -> null
  assert data["model"]["embedding_dim"] == 64
  assert data["summary"] and "count_codes_gbm" in data["summary"][0]

  md = (out / "report.md").read_text()
  assert "# Validation report: readmission_30d" in md
  assert "| metric | biofm | count_codes_gbm | prevalence |" in md
  auroc_row = next(line for line in md.splitlines() if line.startswith("| auroc |"))
  lo, hi = report["splits"]["held_out"]["intervals"]["auroc"]
  assert f"{report['splits']['held_out']['metrics']['auroc']:.3f} [{lo:.3f}, {hi:.3f}]" in auroc_row
  assert auroc_row.rstrip().endswith("| n/a |")
  assert "Subgroups of held_out by sex" in md and "| sex | n |" in md
  assert "| method | k=1 | k=2 | k=4 | k=8 |" in md and "0.800 ± 0.020" in md
  for png in ("roc.png", "calibration.png", "few_shot.png"):
    assert f"]({png})" in md
    assert (out / png).read_bytes().startswith(PNG_MAGIC)
  assert not (out / "km_by_risk.png").exists()

  page = (out / "report.html").read_text()
  assert page.startswith("<!DOCTYPE html>") and "<table>" in page and '<img src="roc.png"' in page
  assert "count_codes_gbm" in page
  assert sorted(p.name for p in out.iterdir()) == sorted(
      ["report.json", "report.md", "report.html", "roc.png", "calibration.png", "few_shot.png"])


def test_survival_report_draws_kaplan_meier(tmp_path):
  rng = np.random.default_rng(0)
  risk = rng.normal(size=300)
  targets = {"time": rng.exponential(1 / np.exp(risk)) * 365, "event": rng.uniform(size=300) < 0.7}
  report = {"task": {"name": "mortality", "type": "survival"}, "model": {"name": "biofm"},
            "splits": {"held_out": _split("survival", targets, risk)},
            "baselines": {"cox_age_sex": {"held_out": _split("survival", targets, risk + rng.normal(size=300))}}}
  out = R.write_report(tmp_path, report, curves_by_method={"biofm": M.curves("survival", targets, risk)})
  data = json.loads((out / "report.json").read_text())
  assert data["held_out"]["c_index"] == pytest.approx(report["splits"]["held_out"]["metrics"]["c_index"])
  assert data["held_out"]["events"] == int(targets["event"].sum())
  assert (out / "km_by_risk.png").read_bytes().startswith(PNG_MAGIC)
  md = (out / "report.md").read_text()
  assert "cox_age_sex" in md and "| c_index |" in md and "](km_by_risk.png)" in md
  assert not (out / "roc.png").exists()


def test_regression_report_has_no_curve_plots(tmp_path):
  rng = np.random.default_rng(0)
  y = rng.normal(size=200)
  targets = {"label": y}
  report = {"task": {"name": "length_of_stay", "type": "regression"}, "model": {"name": "biofm"},
            "splits": {"held_out": _split("regression", targets, y + rng.normal(scale=0.5, size=200))},
            "baselines": {"mean": {"held_out": {"metrics": {"r2": 0.0, "mae": 0.8}}}},
            "summary": ["written by hand"]}
  out = R.write_report(tmp_path, report, curves_by_method={"biofm": M.curves("regression", targets, y)})
  data = json.loads((out / "report.json").read_text())
  assert data["held_out"]["r2"] > 0.5 and data["summary"] == ["written by hand"]
  assert not list(out.glob("*.png"))
  md = (out / "report.md").read_text()
  assert "| r2 |" in md and "| metric | biofm | mean |" in md and "written by hand" in md
  assert (out / "report.html").exists()


def test_summary_lines_compare_against_best_baseline():
  report = {"task": {"name": "t", "type": "binary"},
            "splits": {"held_out": {"metrics": {"auroc": 0.812}, "intervals": {"auroc": (0.77, 0.85)}}},
            "baselines": {"lr": {"held_out": {"metrics": {"auroc": 0.70}, "intervals": {"auroc": [0.65, 0.75]}}},
                          "gbm": {"held_out": {"metrics": {"auroc": np.float32(0.79)},
                                               "intervals": {"auroc": [0.75, 0.83]}}}}}
  line = R.summary_lines(report)[0]
  assert line.startswith("held_out auroc 0.812 [0.770, 0.850] vs best baseline gbm 0.790 [0.750, 0.830]: +0.022")
  assert line.endswith("(intervals overlap)")
  report["baselines"] = {"lr": report["baselines"]["lr"]}
  assert R.summary_lines(report)[0].endswith("+0.112 (intervals do not overlap)")
  del report["baselines"]
  assert "no baseline" in R.summary_lines(report)[0]


def test_crash_while_writing_keeps_previous_report_and_no_temp_files(tmp_path, monkeypatch):
  report, _ = _binary_report()
  R.write_report(tmp_path, report)
  before = (tmp_path / "report.json").read_bytes()

  def failing_fsync(fd):
    raise OSError("disk full")

  monkeypatch.setattr(R.os, "fsync", failing_fsync)
  report["task"]["name"] = "changed"
  with pytest.raises(OSError, match="disk full"):
    R.write_report(tmp_path, report)
  assert (tmp_path / "report.json").read_bytes() == before
  assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_split_named_like_a_top_level_key_is_rejected(tmp_path):
  report = {"task": {"name": "t", "type": "regression"}, "splits": {"summary": {"metrics": {"r2": 0.1}}}}
  with pytest.raises(ValueError, match="collides"):
    R.write_report(tmp_path, report)


def test_a_split_without_its_metric_gets_a_summary_line_saying_why_and_a_note_in_the_report(tmp_path):
  why = "one class (class 0: 30 rows, class 1: 0 rows)"
  report = {"task": {"name": "t", "type": "binary"},
            "splits": {"tuning": {"metrics": {"auroc": 0.8, "n": 40}},
                       "held_out": {"metrics": {"auroc": float("nan"), "n": 30}, "undefined": {"auroc": why}}},
            "baselines": {"lr": {"tuning": {"metrics": {"auroc": 0.7}}, "held_out": {"metrics": {"auroc": None}}}}}
  assert R.summary_lines(report) == [
      "tuning auroc 0.800 vs best baseline lr 0.700: +0.100 (no intervals to compare)",
      f"held_out auroc n/a ({why}): the models are not compared on held_out"]
  del report["splits"]["held_out"]["undefined"]  # a hand-written report: still never silently left out
  assert R.summary_lines(report)[1] == ("held_out auroc n/a (not defined on this split's labels): the models are "
                                        "not compared on held_out")
  report["splits"]["held_out"]["undefined"] = {"auroc": why}
  R.write_report(tmp_path, report)
  assert f"- auroc is n/a on held_out: {why}" in (tmp_path / "report.md").read_text()
  assert json.loads((tmp_path / "report.json").read_text())["splits"]["held_out"]["undefined"] == {"auroc": why}
