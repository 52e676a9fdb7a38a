"""A labelled split whose primary metric is undefined (a held-out split with one class: no
AUROC) is warned about with the split, the task and the class counts; the report records
why the metric is absent and its summary says the models are not compared there, instead
of silently comparing them on the other split alone."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from biofm_jax.eval import downstream
from biofm_jax.data.labels import TaskInfo


@pytest.mark.parametrize("task_type, targets, classes, why", [
    ("binary", {"label": np.zeros(30)}, (), "one class (class 0: 30 rows, class 1: 0 rows)"),
    ("binary", {"label": np.array([0, 1, 1.0])}, (), None),
    ("multiclass", {"label": np.full(4, 2)}, ("a", "b", "c"), "one class (class a: 0 rows, class b: 0 rows, "
                                                               "class c: 4 rows)"),
    ("multiclass", {"label": np.array([0, 2])}, ("a", "b", "c"), None),
    ("multilabel", {"label": np.array([[1, 0], [1, 0.0]])}, ("x", "y"),
     "no label with both outcomes (positives: x 2 of 2, y 0 of 2)"),
    ("multilabel", {"label": np.array([[1, 0], [0, 0.0]])}, ("x", "y"), None),
    ("survival", {"time": np.ones(5), "event": np.zeros(5, bool)}, (), "no event among its 5 rows (C-index needs one)"),
    ("regression", {"label": np.full(3, 2.5)}, (), "one target value in all its 3 rows"),
    ("regression", {"label": np.array([1.0, 2.0])}, (), None),
])
def test_undefined_primary_metric_says_why_with_the_counts(task_type, targets, classes, why):
  assert downstream.undefined_primary_metric(task_type, targets, classes) == why


def test_a_one_class_held_out_split_is_warned_about_recorded_and_not_silently_skipped(tmp_path, caplog):
  rng = np.random.default_rng(0)
  tuning, held_out = rng.integers(0, 2, 40).astype(np.float32), np.zeros(30, np.float32)
  targets = {"tuning": {"label": tuning}, "held_out": {"label": held_out}}
  scores = {name: {s: rng.uniform(size=len(t["label"])) for s, t in targets.items()}
            for name in (downstream.PROBE, downstream.COUNT_LOGISTIC, downstream.SCRATCH)}
  options = downstream.EvaluationOptions(subgroups=(), bootstrap_samples=5)
  with caplog.at_level(logging.WARNING, logger="biofm_jax"):
    report = downstream.write_evaluation(
        tmp_path, {"name": "readmission", "type": "binary"}, {"name": downstream.PROBE}, TaskInfo("binary", 1),
        scores, {name: {} for name in scores}, targets, {s: {} for s in targets}, tuning, {}, options,
        row_ids={s: {"row_index": np.arange(len(t["label"]))} for s, t in targets.items()})
  why = "one class (class 0: 30 rows, class 1: 0 rows)"
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [f"evaluation of task 'readmission': the held_out split has {why}, so its auroc is undefined; "
                      "the summary compares the models on tuning only"]
  written = json.loads((tmp_path / "report.json").read_text())
  assert written["held_out"]["auroc"] is None and written["splits"]["held_out"]["undefined"] == {"auroc": why}
  assert "undefined" not in written["splits"]["tuning"]
  summary = written["summary"]
  assert summary[0].startswith("tuning auroc ") and "vs best baseline" in summary[0]
  assert summary[1] == f"held_out auroc n/a ({why}): the models are not compared on held_out"
  assert f"pre-training vs the same architecture from scratch: not compared, held_out auroc is n/a ({why})" in summary
  assert report["summary"] == summary
  assert f"- auroc is n/a on held_out: {why}" in (tmp_path / "report.md").read_text()
