"""The settings real runs use, trained end to end on a tiny model: bf16 compute, saved
matmuls rematerialised, several windows packed per row and the layers scanned (the `base`
presets' choices; unit checks alone cover them elsewhere).

A bf16 run must track the float32 run of the same data (a broken cast or an overflowing
reduction shows as a curve that leaves it), resume exactly, and give the same curve on two
meshes within bf16's rounding.
"""
import jax
import numpy as np
import pytest

import helpers

pytestmark = pytest.mark.devices(8)  # meshes of up to 8 devices (tests/conftest.py)

SPEC = "configs/ehr_bert.py:tiny"
PRODUCTION = dict(model__dtype="bfloat16", model__remat="dots_with_no_batch_dims_saveable",
                  model__layer_loop="scan", data__ehr__pack=True)
STEPS = 12


def _overrides(meds, **extra):
  return dict(data__ehr__path=str(meds), **helpers.constant_lr_overrides(STEPS), **extra)


def test_bf16_packed_remat_training_tracks_float32_and_agrees_across_meshes(synthetic_meds, tmp_path_factory):
  runs = helpers.train_on_meshes(SPEC, [(8, 1, 1), (2, 2, 2)], tmp_path_factory.mktemp,
                                 **_overrides(synthetic_meds, **PRODUCTION))
  reference = helpers.train_losses(runs[(8, 1, 1)][0])
  assert len(reference) == STEPS and reference[STEPS] < 0.9 * reference[1], reference
  # Another mesh sums in another order: bf16's 8-bit mantissa, not a different computation.
  other = runs[(2, 2, 2)][0]
  helpers.assert_curves_close(helpers.train_losses(other), reference, atol=0.02)
  # Adam scales each update to about the learning rate whatever the gradient's size, so a
  # parameter whose gradient is rounding noise (a rare code's embedding) may move either way:
  # nearly every parameter must agree closely, and none by more than Adam's reach.
  config = runs[(8, 1, 1)][1]
  reach = config.train.learning_rate * STEPS
  gaps = {path: np.abs(a - b) for path, a, b in _leaves(helpers.final_params(other, config),
                                                        helpers.final_params(runs[(8, 1, 1)][0], config))}
  assert max(gap.max() for gap in gaps.values()) <= reach
  every = np.concatenate([gap.ravel() for gap in gaps.values()])
  # Seen: 0.14% of parameters apart by more than 2e-3, the largest gap 0.025 (one rare code).
  assert np.mean(every > 2e-3) <= 0.01, {path: float(gap.max()) for path, gap in gaps.items()}

  float32 = tmp_path_factory.mktemp("float32")
  helpers.train(helpers.config_for(SPEC, **_overrides(synthetic_meds, **{**PRODUCTION, "model__dtype": "float32"})),
                float32)
  helpers.assert_curves_close(reference, helpers.train_losses(float32), atol=0.02)  # seen: 0.003 at most


def test_bf16_packed_remat_training_resumes_exactly(synthetic_meds, tmp_path):
  helpers.assert_resume_reproduces(SPEC, tmp_path / "resumed", stop_at=STEPS // 2, num_steps=STEPS, atol=0.0,
                                   data__ehr__path=str(synthetic_meds), **PRODUCTION)


def _leaves(a, b):
  flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
  return [(jax.tree_util.keystr(path), np.asarray(x, np.float32), np.asarray(flat_b[path], np.float32))
          for path, x in jax.tree_util.tree_leaves_with_path(a)]
