"""The ranked-probability objective for ordered value bins (`objectives/ordinal_values.py`),
the example objective of the README's "How to add an objective": its own file, one
registry line, a config and these tests (the contract walk in test_contracts.py trains it
through the loop with every other row)."""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
from biofm_jax.data import batch as B
from biofm_jax.modalities import registry
from biofm_jax.objectives.ordinal_values import OrdinalValueModelling, ranked_probability_sums


def _rps_by_hand(probs: np.ndarray, target: int) -> float:
  cdf, truth = np.cumsum(probs), (np.arange(len(probs)) >= target).astype(float)
  return float(np.mean((cdf - truth) ** 2))


def test_the_score_is_the_mean_squared_gap_between_cumulative_curves():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 6)).astype(np.float32)
  targets = rng.integers(1, 6, size=(3, 5))
  weights = rng.random((3, 5)) > 0.4
  rps, hits = ranked_probability_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights))
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  expected = sum(_rps_by_hand(probs[i, j], targets[i, j]) for i, j in zip(*np.nonzero(weights)))
  assert float(rps) == pytest.approx(expected, rel=1e-5)
  assert float(hits) == float(((logits.argmax(-1) == targets) & weights).sum())


def test_a_bin_further_off_costs_more_where_cross_entropy_costs_the_same():
  target = jnp.asarray([3])
  confident = lambda k: jnp.asarray([[-20.0 if c != k else 20.0 for c in range(8)]])  # noqa: E731
  near, far = (float(ranked_probability_sums(confident(k), target, jnp.ones(1, bool))[0]) for k in (4, 7))
  exact = float(ranked_probability_sums(confident(3), target, jnp.ones(1, bool))[0])
  assert exact == pytest.approx(0.0, abs=1e-6) and 0 < near < far
  assert far == pytest.approx(4 * near, rel=1e-4)  # 4 cumulative steps wrong against 1


def test_only_masked_positions_with_a_value_count_and_slots_gather_them():
  seq = {B.TARGET_VALUE_BINS: jnp.asarray([[0, 2, 3, 1, 4, 0]]),
         B.TARGET_MASK: jnp.asarray([[False, True, False, True, True, True]])}  # the last has no value
  logits = jnp.zeros((1, 6, 5))
  everywhere = OrdinalValueModelling(modality="omics")
  assert float(everywhere.counts({"omics": seq})["value_rps"]) == 3.0
  slotted = OrdinalValueModelling(modality="omics", prediction_slots=4)
  assert float(slotted.counts({"omics": seq})["value_rps"]) == 3.0
  full = everywhere.sums({"omics": {"value_logits": logits}}, {"omics": seq})["value_rps"]
  gathered = slotted.sums({"omics": {"value_logits": logits[:, :4]}}, {"omics": seq})["value_rps"]
  assert float(full) == pytest.approx(float(gathered), rel=1e-6)


def test_the_registry_builds_it_for_binned_expression_and_refuses_data_without_bins():
  cfg = ml_collections.ConfigDict({"name": "masked_ordinal"})
  objective = registry.build_objective(cfg, "omics", {"num_value_bins": 16, "prediction_slots": 24})
  assert isinstance(objective, OrdinalValueModelling) and objective.prediction_slots == 24
  assert registry.objective_kind("masked_ordinal", "omics").targets == "masked"
  with pytest.raises(ValueError, match=r"^objective\.name='masked_ordinal': the omics data has no value bins"):
    registry.build_objective(cfg, "omics", {"num_value_bins": 0})
  with pytest.raises(ValueError, match=r"omics_ordinal: preset 'tiny_rank' tokenizes by rank"):
    helpers.config_for("configs/omics_ordinal.py:tiny_rank")


def test_expression_pretraining_beats_the_context_free_score(tmp_path):
  """Bins are quantiles of each cell's own values, so they are about uniform over 1..K; a
  model that knew nothing of the cell would predict that marginal, whose expected score is
  mean_k F(k)(1 - F(k)) with F(k) = k / K (k = 0..K). Training must fall and end well below it."""
  config = helpers.config_for("configs/omics_ordinal.py:tiny", train__num_steps=40, train__eval_every=40,
                              train__log_every=5, train__eval_batches=2, checkpoint__every_steps=40)
  summary = helpers.train(config, tmp_path / "run")
  losses = helpers.train_losses(tmp_path / "run")
  k = config.data.omics.num_value_bins
  cdf = np.arange(k + 1) / k
  context_free = float(np.mean(cdf * (1 - cdf)))  # 0.156 for 16 bins
  steps = sorted(losses)
  assert losses[steps[-1]] < losses[steps[0]], losses
  # Seen: 0.135 over the first 5 steps, 0.105 held out after 40.
  assert summary["eval/value_rps"] < 0.8 * context_free, (summary["eval/value_rps"], context_free)
