"""The multimodal model: absent modalities never leak into the result, for every fusion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from biofm_jax.config import base_config
from biofm_jax.data import batch as B
from biofm_jax.modalities import registry
from biofm_jax.models.fusion import FUSIONS, MultimodalModel

BATCH = 4
INFO = {
    "ehr": {"vocab_size": 20, "num_value_bins": 3, "max_len": 8},
    "imaging": {"image_shape": (8, 8), "patch_shape": (4, 4), "channels": 1, "num_patches": 4},
    "tabular": {"num_numeric": 3, "num_categorical": 1, "num_categories": 5},
}


def make_config(fusion: str, projection_dim: int = 8):
  config = base_config()
  config.model.update(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32)
  config.model.decoder = dict(num_layers=1, embed_dim=16, num_heads=2, mlp_dim=32)
  config.model.fusion = dict(type=fusion, modality_layers=1, num_latents=4, projection_dim=projection_dim)
  config.data.imaging = dict(mask_ratio=0.5)
  config.objective = dict(name="multimodal", contrastive=dict(loss="siglip", weight=1.0 if projection_dim else 0.0))
  return config


def random_example(modality: str, rng: np.random.Generator) -> dict:
  if modality == "ehr":
    spec = B.ehr_example_spec(8, with_targets=False)
    ex = {name: rng.integers(0, 3, (BATCH,) + shape).astype(dtype) for name, (shape, dtype) in spec.items()}
    ex[B.EHR_CODES] = rng.integers(4, 20, (BATCH, 8)).astype(np.int32)
    ex[B.EHR_AGE] = rng.uniform(20, 80, (BATCH, 8)).astype(np.float32)
    ex[B.EHR_MASK] = np.arange(8)[None] < rng.integers(2, 9, (BATCH, 1))
    return ex
  if modality == "imaging":
    visible = np.stack([rng.permutation(4) for _ in range(BATCH)]).astype(np.int32)
    return {B.IMAGE: rng.normal(size=(BATCH, 8, 8, 1)).astype(np.float32), B.VALID: np.ones(BATCH, bool),
            B.IMAGE_VISIBLE: visible[:, :2], B.IMAGE_MASKED: visible[:, 2:]}
  return {B.VALID: np.ones(BATCH, bool), B.TABULAR_VALUES: rng.normal(size=(BATCH, 3)).astype(np.float32),
          B.TABULAR_MISSING: rng.random((BATCH, 3)) < 0.3,
          B.TABULAR_CATEGORIES: rng.integers(0, 5, (BATCH, 1)).astype(np.int32)}


def random_batch(seed: int, present: dict[str, np.ndarray]) -> dict:
  rng = np.random.default_rng(seed)
  return {m: {**random_example(m, rng), B.PRESENT: present[m]} for m in present}


def build(fusion: str, projection_dim: int = 8) -> MultimodalModel:
  return registry.build_model(make_config(fusion, projection_dim), INFO)


@pytest.fixture(scope="module", params=FUSIONS)
def fusion_model(request):
  model = helpers.Jitted(build(request.param))
  all_present = {m: np.ones(BATCH, bool) for m in INFO}
  params = model.init(jax.random.key(0), random_batch(0, all_present))["params"]
  return model, jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                             is_leaf=lambda x: hasattr(x, "unbox"))


def apply(model, params, batch):
  return model.apply({"params": params}, batch)  # one compiled program per batch structure


def test_absent_modality_equals_a_model_given_only_the_present_ones(fusion_model):
  model, params = fusion_model
  present = {"ehr": np.ones(BATCH, bool), "imaging": np.zeros(BATCH, bool), "tabular": np.ones(BATCH, bool)}
  with_absent = random_batch(1, present)
  without = {m: v for m, v in with_absent.items() if m != "imaging"}
  a, b = apply(model, params, with_absent), apply(model, params, without)
  np.testing.assert_allclose(a["fused"]["embedding"], b["fused"]["embedding"], atol=1e-5)
  for m, key in (("ehr", "code_logits"), ("ehr", "embedding"), ("tabular", "value_predictions"),
                 ("tabular", "embedding")):
    np.testing.assert_allclose(a[m][key], b[m][key], atol=1e-5, err_msg=f"{m}/{key}")
  for m in ("ehr", "tabular"):
    np.testing.assert_allclose(a["contrastive"][m], b["contrastive"][m], atol=1e-5)


def test_padding_content_of_an_absent_modality_changes_nothing(fusion_model):
  """Per example: subject 0 lacks imaging; whatever its imaging slot holds is invisible."""
  model, params = fusion_model
  present = {m: np.ones(BATCH, bool) for m in INFO}
  present["imaging"] = np.array([False, True, True, True])
  batch = random_batch(2, present)
  garbage = jax.tree.map(np.copy, batch)
  garbage["imaging"][B.IMAGE][0] = 1e3 * np.random.default_rng(9).normal(size=(8, 8, 1))
  a, b = apply(model, params, batch), apply(model, params, garbage)
  np.testing.assert_allclose(a["fused"]["embedding"][0], b["fused"]["embedding"][0], atol=1e-5)
  np.testing.assert_allclose(a["ehr"]["code_logits"][0], b["ehr"]["code_logits"][0], atol=1e-5)
  # The same change to a subject who has the image does change its fused embedding.
  garbage["imaging"][B.IMAGE][1] = garbage["imaging"][B.IMAGE][0]
  c = apply(model, params, garbage)
  assert np.abs(np.asarray(c["fused"]["embedding"][1] - a["fused"]["embedding"][1])).max() > 1e-3


def test_every_output_is_finite_when_a_subject_has_no_modality(fusion_model):
  model, params = fusion_model
  present = {m: np.array([False, True, True, False]) for m in INFO}
  out = apply(model, params, random_batch(3, present))
  for path, leaf in jax.tree_util.tree_leaves_with_path(out):
    assert np.isfinite(np.asarray(leaf)).all(), jax.tree_util.keystr(path)
  np.testing.assert_array_equal(np.asarray(out["fused"]["embedding"][0]), 0.0)


def test_heads_match_the_single_modality_outputs_in_shape():
  model = build("early")
  batch = random_batch(4, {m: np.ones(BATCH, bool) for m in INFO})
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), batch)[0])
  assert out["ehr"]["code_logits"].shape == (BATCH, 8, 20)
  assert out["ehr"]["value_logits"].shape == (BATCH, 8, 4)
  assert out["imaging"]["predicted_patches"].shape == (BATCH, 2, 16)
  assert out["tabular"]["category_logits"].shape == (BATCH, 1, 5)
  assert out["fused"]["embedding"].shape == (BATCH, 16)
  assert out["contrastive"]["imaging"].shape == (BATCH, 8)
  assert "contrastive" not in jax.eval_shape(
      lambda: build("early", projection_dim=0).init_with_output(jax.random.key(0), batch)[0])


def test_every_parameter_has_logical_axes():
  for fusion in FUSIONS:
    batch = random_batch(5, {m: np.ones(BATCH, bool) for m in INFO})
    boxed = jax.eval_shape(lambda: build(fusion).init(jax.random.key(0), batch))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda x: hasattr(x, "names"))
    unnamed = [jax.tree_util.keystr(p) for p, leaf in leaves if not hasattr(leaf, "names")]
    assert not unnamed, f"{fusion}: parameters without logical axes: {unnamed}"


def test_unknown_fusion_is_an_error_naming_the_field():
  with pytest.raises(ValueError, match="model.fusion.type"):
    build("middle").init(jax.random.key(0), random_batch(6, {m: np.ones(BATCH, bool) for m in INFO}))


def test_contrastive_projections_never_see_the_other_modalities(fusion_model):
  """A subject's EHR projection must not change when its (present) image does, or retrieval
  would be answered by the image itself; the fused embedding does change."""
  model, params = fusion_model
  batch = random_batch(7, {m: np.ones(BATCH, bool) for m in INFO})
  changed = jax.tree.map(np.copy, batch)
  changed["imaging"][B.IMAGE] = np.random.default_rng(8).normal(size=changed["imaging"][B.IMAGE].shape)
  a, b = apply(model, params, batch), apply(model, params, changed)
  np.testing.assert_allclose(a["contrastive"]["ehr"], b["contrastive"]["ehr"], atol=1e-6)
  np.testing.assert_allclose(a["contrastive"]["tabular"], b["contrastive"]["tabular"], atol=1e-6)
  assert np.abs(np.asarray(a["fused"]["embedding"] - b["fused"]["embedding"])).max() > 1e-3


def test_gradients_are_finite_when_subjects_lack_every_modality(fusion_model):
  model, params = fusion_model
  batch = random_batch(9, {m: np.array([False, True, False, True]) for m in INFO})

  def total(p):
    out = model.apply({"params": p}, batch)
    leaves = [out["fused"]["embedding"], out["ehr"]["code_logits"], out["imaging"]["predicted_patches"],
              out["tabular"]["value_predictions"], out["contrastive"]["ehr"]]
    return sum(jnp.sum(leaf ** 2) for leaf in leaves)

  grads = jax.jit(jax.grad(total))(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(leaf)).all(), jax.tree_util.keystr(path)
