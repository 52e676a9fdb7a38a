"""Learning: on a synthetic cohort with planted structure, the tiny models beat the
context-free unigram baseline on the held-out (tuning) split by a wide margin."""
import pytest

import helpers
from biofm_jax.modalities.ehr.synthetic import write_synthetic_meds
from biofm_jax.train.metric_writer import read_metrics


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  return write_synthetic_meds(tmp_path_factory.mktemp("learning") / "cohort", num_subjects=600, seed=1)


@pytest.mark.parametrize("spec, max_ratio", [("configs/ehr_bert.py:tiny", 0.8), ("configs/ehr_gpt.py:tiny", 0.6)])
def test_held_out_loss_falls_well_below_the_unigram_baseline(spec, max_ratio, cohort, tmp_path):
  config = helpers.config_for(spec, data__ehr__path=str(cohort), train__num_steps=300, train__eval_every=100,
                              train__eval_batches=0, train__log_every=25, checkpoint__every_steps=1000)
  summary = helpers.train(config, tmp_path)
  baseline = summary["baseline/unigram_code_loss"]
  evals = [r["eval/code_loss"] for r in read_metrics(tmp_path) if "eval/code_loss" in r]
  print(f"{spec}: held-out code loss by evaluation {evals}, unigram baseline {baseline:.3f}")
  assert len(evals) == 3
  assert evals[-1] < max_ratio * baseline
  assert evals[-1] < evals[0]
  train = [r["train/loss"] for r in read_metrics(tmp_path) if "train/loss" in r]
  assert train[-1] < 0.8 * train[0]
  assert "eval/loss" in read_metrics(tmp_path)[-1]
