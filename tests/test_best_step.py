"""A run that chooses its best step on the tuning split (`checkpoint.best_metric`) keeps that
step beside the newest, reads it back wherever the finished run is read, and stops when the
figure has not improved for `checkpoint.best_patience` evaluations, also across a resume."""
import jax
import numpy as np
import pytest

import helpers
from biofm_jax.train.best_step import BestStep
from biofm_jax.train.checkpoint import Checkpointer, restore_run_params
from biofm_jax.train.metric_writer import read_metrics
from biofm_jax.train.runs import open_run

SPEC = "configs/ehr_bert.py:tiny"
# "max" of a loss that falls from its first evaluation on: the best step is the first
# evaluation, a step the newest-only policy (keep=1) would have deleted.
WORST_FIRST = dict(train__num_steps=40, train__eval_every=10, train__eval_batches=2, checkpoint__every_steps=1000,
                   checkpoint__keep=1, checkpoint__best_metric="eval/loss", checkpoint__best_mode="max")


def eval_losses(workdir) -> dict[int, float]:
  return {r["step"]: r["eval/loss"] for r in read_metrics(workdir) if "eval/loss" in r}


def test_the_record_keeps_the_best_figure_and_counts_evaluations_since():
  best = BestStep(metric="eval/loss", mode="min", patience=2)
  assert not best.record(10, {"eval/loss": 3.0})
  assert not best.record(20, {"eval/loss": 2.0})
  assert not best.record(30, {"eval/loss": 2.0})  # equal is not better
  assert best.record(40, {"eval/loss": 2.5})
  assert (best.best_step, best.best_value, best.evals_since) == (20, 2.0, 2)
  with pytest.raises(ValueError, match=r"'eval/accuracy' is not among .*\['eval/loss'\]"):
    BestStep(metric="eval/accuracy").record(10, {"eval/loss": 1.0})


def test_without_a_tuning_split_the_newest_step_stands_with_a_warning(caplog):
  config = helpers.config_for(SPEC, checkpoint__best_metric="eval/loss", checkpoint__best_patience=3)
  with caplog.at_level("WARNING", logger="biofm_jax"):
    best = BestStep.from_config(config, evaluates=False)
  assert best.metric == "" and not best.patience and not best.record(10, {})
  assert "no tuning split to evaluate on, so the newest step stands" in caplog.text


@pytest.mark.parametrize("overrides, message", [
    (dict(checkpoint__best_patience=2), "best_patience needs config.checkpoint.best_metric"),
    (dict(checkpoint__best_metric="eval/loss", train__eval_every=0), "needs evaluations: train.eval_every > 0"),
    (dict(checkpoint__best_metric="eval/loss", checkpoint__best_mode="lowest"), "best_mode is 'lowest'"),
    (dict(checkpoint__best_metric="eval/loss", checkpoint__best_patience=-1), "best_patience is -1"),
])
def test_bad_best_step_settings_are_one_line_errors(overrides, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    helpers.train(helpers.config_for(SPEC, train__num_steps=2, **overrides), tmp_path)


def test_the_best_step_is_kept_beside_the_newest_and_read_back_as_the_run(tmp_path):
  summary = helpers.train(helpers.config_for(SPEC, **WORST_FIRST), tmp_path)
  losses = eval_losses(tmp_path)
  assert sorted(losses) == [10, 20, 30, 40] and losses[10] > losses[20] > losses[40]
  assert summary["best_step"] == 10 and summary["best/eval/loss"] == pytest.approx(losses[10])
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=1000, async_save=False)
  try:
    assert checkpointer.all_steps() == [10, 40]  # keep=1 alone would have left step 40 only
    assert checkpointer.recorded("eval/loss") == pytest.approx({10: losses[10], 40: losses[40]})
  finally:
    checkpointer.close()
  # What reads the finished run (scoring, export, fine-tuning from it) reads step 10.
  _, _, setup, params, step = open_run(tmp_path)
  assert step == 10
  restored_step, restored = restore_run_params(tmp_path, setup.abstract_state.params)
  assert restored_step == 10
  newest = helpers.final_params(tmp_path, None)  # step 40's, as resuming reads it
  host = jax.tree.map(np.asarray, params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), host, restored)
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(newest))) > 1e-4


def test_patience_stops_training_and_a_rerun_stays_stopped(tmp_path):
  summary = helpers.train(helpers.config_for(SPEC, **WORST_FIRST, checkpoint__best_patience=2), tmp_path)
  # best at 10, no better at 20 and 30: two evaluations without improvement end the run
  assert summary["steps"] == 30 and summary["best_step"] == 10
  assert sorted(eval_losses(tmp_path)) == [10, 20, 30]
  rows = len(read_metrics(tmp_path))
  again = helpers.train(helpers.config_for(SPEC, **WORST_FIRST, checkpoint__best_patience=2), tmp_path)
  assert again["steps"] == 30 and again["start_step"] == 30 and again["best_step"] == 10
  assert len(read_metrics(tmp_path)) == rows
