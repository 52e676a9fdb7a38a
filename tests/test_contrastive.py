"""Contrastive alignment: CLIP and SigLIP match a float64 reference, absent subjects are
fully excluded, the loss and its gradients agree on every mesh, and the config is checked."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from biofm_jax import parallel
from biofm_jax.objectives import weighted_loss
from biofm_jax.objectives.contrastive import (ContrastiveAlignment, clip_row_losses, parse_pairs,
                                              siglip_row_losses, similarity)

pytestmark = pytest.mark.devices(8)  # meshes of up to 8 devices (tests/conftest.py)

PAIRS = (("ehr", "imaging"), ("ehr", "omics"))
MODALITIES = ("ehr", "imaging", "omics")
INIT = {"clip": (np.log(1 / 0.07), 0.0), "siglip": (np.log(10.0), -10.0)}


def make_inputs(seed: int, batch_size: int = 16, dim: int = 8, loss: str = "clip"):
  """Random projections and presence flags with some subjects missing some modalities."""
  rng = np.random.default_rng(seed)
  embeddings = {m: rng.normal(size=(batch_size, dim)).astype(np.float32) for m in MODALITIES}
  present = {m: rng.random(batch_size) < 0.75 for m in MODALITIES}
  scale, bias = INIT[loss]
  # Moderate scale and a non-trivial bias, so every part of the loss matters.
  return embeddings, present, np.float32(scale * 0.5), np.float32(bias * 0.3)


def as_model_io(embeddings, present, scale, bias):
  outputs = {"contrastive": {**embeddings, "logit_scale": scale, "logit_bias": bias}}
  batch = {m: {"present": present[m]} for m in present}
  return outputs, batch


def reference(loss: str, a, b, valid, scale, bias):
  """The textbook losses in float64 on the valid subjects only: (mean loss, top-1, n)."""
  a, b = np.asarray(a, np.float64)[valid], np.asarray(b, np.float64)[valid]
  n = len(a)
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  logits = np.exp(np.float64(scale)) * a @ b.T
  if loss == "clip":
    def ce(x):
      return np.log(np.exp(x).sum(axis=1)) - np.diag(x)
    per_row = (ce(logits) + ce(logits.T)) / 2
    mean = per_row.mean()
  else:
    logits = logits + np.float64(bias)
    z = 2 * np.eye(n) - 1
    mean = -np.sum(np.log(1 / (1 + np.exp(-z * logits)))) / n
  top1 = np.mean(np.argmax(logits, axis=1) == np.arange(n))
  return mean, top1, n


def loss_fn(objective, embeddings, present, scale, bias):
  outputs, batch = as_model_io(embeddings, present, scale, bias)
  return weighted_loss(objective, objective.sums(outputs, batch), objective.counts(batch))


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_matches_float64_reference(loss):
  objective = ContrastiveAlignment(pairs=PAIRS, loss=loss)
  embeddings, present, scale, bias = make_inputs(0, loss=loss)
  outputs, batch = as_model_io(embeddings, present, scale, bias)
  sums, counts = objective.sums(outputs, batch), objective.counts(batch)
  assert set(sums) == set(counts) == {"ehr_imaging_contrastive", "ehr_imaging_top1", "ehr_omics_contrastive",
                                      "ehr_omics_top1"}
  assert set(objective.loss_weights) == {"ehr_imaging_contrastive", "ehr_omics_contrastive"}
  total = 0.0
  for a, b in PAIRS:
    valid = present[a] & present[b]
    mean, top1, n = reference(loss, embeddings[a], embeddings[b], valid, scale, bias)
    assert 2 <= n < len(valid)  # some subjects really are excluded
    assert float(counts[f"{a}_{b}_contrastive"]) == float(counts[f"{a}_{b}_top1"]) == n
    np.testing.assert_allclose(float(sums[f"{a}_{b}_contrastive"]) / n, mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(sums[f"{a}_{b}_top1"]) / n, top1, atol=1e-7)
    total += mean
  np.testing.assert_allclose(float(loss_fn(objective, embeddings, present, scale, bias)), total, rtol=1e-5)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_absent_subjects_change_nothing(loss):
  objective = ContrastiveAlignment(pairs=PAIRS, loss=loss)
  embeddings, present, scale, bias = make_inputs(1, loss=loss)
  grad_fn = jax.jit(jax.value_and_grad(functools.partial(loss_fn, objective), argnums=(0, 2, 3)))
  base_loss, base_grads = grad_fn(embeddings, present, scale, bias)
  # The rows of a modality that enter no pair: absent themselves or partner absent.
  used = {"ehr": (present["ehr"] & present["imaging"]) | (present["ehr"] & present["omics"]),
          "imaging": present["ehr"] & present["imaging"], "omics": present["ehr"] & present["omics"]}
  for fill in [0.0, 1e30, np.inf, np.nan]:
    changed = {m: np.where(used[m][:, None], x, np.float32(fill)) for m, x in embeddings.items()}
    loss_value, grads = grad_fn(changed, present, scale, bias)
    assert float(loss_value) == pytest.approx(float(base_loss), rel=1e-6)
    for m in MODALITIES:
      grad = np.asarray(grads[0][m])
      assert np.all(np.isfinite(grad)) and np.all(grad[~used[m]] == 0.0), (fill, m)
      np.testing.assert_allclose(grad, np.asarray(base_grads[0][m]), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.array(grads[1:]), np.array(base_grads[1:]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_all_absent_batch_gives_zero_count_and_finite_zero_loss(loss):
  objective = ContrastiveAlignment(pairs=PAIRS, loss=loss)
  embeddings, present, scale, bias = make_inputs(2, loss=loss)
  embeddings["ehr"][:] = np.nan  # must not leak through the exclusion
  absent = {m: np.zeros_like(p) for m, p in present.items()}
  outputs, batch = as_model_io(embeddings, absent, scale, bias)
  assert all(float(c) == 0.0 for c in objective.counts(batch).values())
  assert all(float(s) == 0.0 for s in objective.sums(outputs, batch).values())
  value, grads = jax.value_and_grad(functools.partial(loss_fn, objective), argnums=(0, 2, 3))(
      embeddings, absent, scale, bias)
  assert float(value) == 0.0
  assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves(grads))


def test_per_subject_losses_of_excluded_subjects_are_exactly_zero():
  # Not merely discarded later: a zero (not inf or NaN) cannot poison a sum by `* 0`.
  embeddings, present, scale, bias = make_inputs(5)
  valid = jnp.asarray(present["ehr"] & present["imaging"])
  logits = np.exp(scale) * similarity(embeddings["ehr"], embeddings["imaging"], valid)
  pair_mask = valid[:, None] & valid[None, :]
  for row_losses in [clip_row_losses(logits, pair_mask), siglip_row_losses(logits + bias, pair_mask)]:
    row_losses = np.asarray(row_losses)
    assert np.all(row_losses[~np.asarray(valid)] == 0.0) and np.all(row_losses[np.asarray(valid)] > 0.0)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_aligned_embeddings_beat_shuffled_ones(loss):
  objective = ContrastiveAlignment(pairs=(("ehr", "imaging"),), loss=loss)
  batch_size = 8
  rng = np.random.default_rng(3)
  aligned = np.linalg.qr(rng.normal(size=(16, 16)))[0][:batch_size].astype(np.float32) * 3.0  # orthogonal rows
  present = {"ehr": np.ones(batch_size, bool), "imaging": np.ones(batch_size, bool)}
  scale, bias = (np.float32(v) for v in INIT[loss])

  def evaluate(imaging):
    outputs, batch = as_model_io({"ehr": aligned, "imaging": imaging}, present, scale, bias)
    sums, counts = objective.sums(outputs, batch), objective.counts(batch)
    return float(weighted_loss(objective, sums, counts)), float(sums["ehr_imaging_top1"] / counts["ehr_imaging_top1"])

  aligned_loss, aligned_top1 = evaluate(aligned)
  shuffled_loss, shuffled_top1 = evaluate(aligned[np.roll(np.arange(batch_size), 1)])
  assert aligned_top1 == 1.0 and shuffled_top1 == 0.0
  assert aligned_loss < shuffled_loss
  if loss == "clip":
    assert aligned_loss < 1e-4  # off-diagonal logits are exp(scale) below the diagonal
  else:
    assert aligned_loss == pytest.approx(np.log(2.0) + (batch_size - 1) * np.log1p(np.exp(-10.0)), rel=1e-5)


def mesh_of(shape):
  data, fsdp, tensor = shape
  return parallel.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor)))


def jitted_value_and_grad(objective, mesh):
  """value_and_grad of the loss, inputs sharded over the mesh's batch axes (None: 1 device)."""
  fn = jax.value_and_grad(functools.partial(loss_fn, objective), argnums=(0, 2, 3))
  if mesh is None:
    return jax.jit(fn)
  rows, scalar = parallel.batch_sharding(mesh), parallel.replicated(mesh)
  return jax.jit(fn, in_shardings=({m: rows for m in MODALITIES}, {m: rows for m in MODALITIES}, scalar, scalar),
                 out_shardings=scalar)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_loss_and_gradients_agree_on_every_mesh(loss):
  objective = ContrastiveAlignment(pairs=PAIRS, loss=loss)
  embeddings, present, scale, bias = make_inputs(4, batch_size=32, loss=loss)
  single = jax.devices()[0]
  on_one = jax.device_put((embeddings, present, scale, bias), single)
  ref_loss, ref_grads = jitted_value_and_grad(objective, None)(*on_one)
  ref_mean, _, _ = reference(loss, embeddings["ehr"], embeddings["imaging"], present["ehr"] & present["imaging"],
                             scale, bias)
  assert float(ref_loss) > ref_mean  # the second pair adds to the first
  for shape in [(8, 1, 1), (2, 4, 1), (2, 2, 2)]:
    mesh = mesh_of(shape)
    rows = parallel.batch_sharding(mesh)
    sharded = (jax.device_put(embeddings, rows), jax.device_put(present, rows), scale, bias)
    assert len(sharded[0]["ehr"].sharding.device_set) == 8
    value, grads = jitted_value_and_grad(objective, mesh)(*sharded)
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=0, atol=1e-5, err_msg=str(shape))
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5, err_msg=str(shape))


def test_parse_pairs():
  assert parse_pairs("ehr-imaging,ehr-omics") == (("ehr", "imaging"), ("ehr", "omics"))
  assert parse_pairs(" ehr - imaging ") == (("ehr", "imaging"),)
  for bad in ["", "ehr", "ehr-imaging,", "ehr-imaging-omics", "-imaging", "ehr-imaging;ehr-omics"]:
    with pytest.raises(ValueError, match="objective.contrastive.pairs"):
      parse_pairs(bad)
  assert ContrastiveAlignment(pairs="ehr-imaging,ehr-omics").pairs == PAIRS
  assert ContrastiveAlignment(pairs=[["ehr", "imaging"]]).pairs == (("ehr", "imaging"),)


@pytest.mark.parametrize("kwargs, field", [
    (dict(pairs=PAIRS, loss="infonce"), "objective.contrastive.loss"),
    (dict(pairs=()), "objective.contrastive.pairs"),
    (dict(pairs=(("ehr", "ehr"),)), "objective.contrastive.pairs"),
    (dict(pairs=(("ehr", "imaging"), ("ehr", "imaging"))), "objective.contrastive.pairs"),
    (dict(pairs=(("ehr", "imaging", "omics"),)), "objective.contrastive.pairs"),
    (dict(pairs=PAIRS, weight=-1.0), "objective.contrastive.weight"),
    (dict(pairs=PAIRS, weight=float("nan")), "objective.contrastive.weight"),
])
def test_config_errors_name_the_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    ContrastiveAlignment(**kwargs)


def test_each_pair_is_weighted_by_weight():
  objective = ContrastiveAlignment(pairs=PAIRS, loss="siglip", weight=0.5)
  assert objective.loss_weights == {"ehr_imaging_contrastive": 0.5, "ehr_omics_contrastive": 0.5}
  assert objective.name == "contrastive"
