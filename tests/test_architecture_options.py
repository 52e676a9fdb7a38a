"""The shared block's options for public architectures (models/layers.py), each against
the computation it names, written out here in numpy; and runs saved before the options
existed resume and load unchanged."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest
from scipy.special import erf

from biofm_jax.config import ARCHITECTURE_DEFAULTS, base_config, config_to_dict
from biofm_jax.models.layers import MLP, Block, TransformerConfig
from biofm_jax.train.loop import check_resume_compatible

CFG = TransformerConfig(num_layers=1, embed_dim=8, num_heads=2, mlp_dim=12, position="none", norm="layernorm")


def _layer_norm(x, p, eps):
  mean = x.mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps) * p["scale"] + p["bias"]


def _dense(x, p):
  kernel = p["kernel"].reshape(x.shape[-1], -1)
  return x @ kernel + (p["bias"].reshape(-1) if "bias" in p else 0)


def _attention(x, p, cfg):
  b, t, _ = x.shape
  q, k, v = (_dense(x, p[n]).reshape(b, t, cfg.num_heads, -1) for n in ("query", "key", "value"))
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("bhqs,bshk->bqhk", probs, v).reshape(b, t, -1)
  return out @ p["out"]["kernel"].reshape(-1, cfg.embed_dim) + (p["out"]["bias"] if "bias" in p["out"] else 0)


def _activation(x, name):
  return {"gelu": lambda z: 0.5 * z * (1 + erf(z / np.sqrt(2))), "relu": lambda z: np.maximum(z, 0),
          "gelu_tanh": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))}[name](x)


def _mlp(x, p, cfg):
  h = _dense(x, p["wi"])
  if cfg.activation == "swiglu":
    gate = _dense(x, p["wi_gate"])
    h = gate / (1 + np.exp(-gate)) * h
  else:
    h = _activation(h, cfg.activation)
  return _dense(h, p["wo"])


def _init(module, *args):
  """The module's parameters, every one moved off its initial value (zero biases, unit
  norm scales would hide a swapped or missing term)."""
  params = nn.meta.unbox(module.init(jax.random.PRNGKey(0), *args)["params"])
  return jax.tree.map(lambda a: np.asarray(a) + 0.3 * np.random.default_rng(a.size).standard_normal(a.shape)
                      .astype(np.float32), params)


@pytest.mark.parametrize("options", [
    dict(norm_position="post", bias=True, activation="relu", norm_eps=1e-12),  # BERT / Geneformer
    dict(norm_position="pre", bias=True, activation="gelu", norm_eps=1e-5),  # ESM-2
    dict(norm_position="pre", bias=False, activation="gelu_tanh"),  # ours
])
def test_a_block_computes_what_its_options_name(options):
  cfg = dataclasses.replace(CFG, **options)
  x = np.random.default_rng(1).standard_normal((2, 5, cfg.embed_dim)).astype(np.float32)
  mask = np.ones((2, 5), bool)
  positions = np.broadcast_to(np.arange(5), (2, 5))
  block = Block(cfg)
  params = _init(block, x, mask, positions)
  got, _ = block.apply({"params": params}, x, mask, positions)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x64 = x.astype(np.float64)
  if cfg.norm_position == "pre":
    h = x64 + _attention(_layer_norm(x64, p["attention_norm"], cfg.norm_eps), p["attention"], cfg)
    want = h + _mlp(_layer_norm(h, p["mlp_norm"], cfg.norm_eps), p["mlp"], cfg)
  else:
    h = _layer_norm(x64 + _attention(x64, p["attention"], cfg), p["attention_norm"], cfg.norm_eps)
    want = _layer_norm(h + _mlp(h, p["mlp"], cfg), p["mlp_norm"], cfg.norm_eps)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)
  assert ("bias" in params["attention"]["query"]) == cfg.bias


def test_a_gated_mlp_multiplies_silu_of_its_gate_into_its_input_projection():
  cfg = dataclasses.replace(CFG, activation="swiglu")
  x = np.random.default_rng(2).standard_normal((2, 3, cfg.embed_dim)).astype(np.float32)
  mlp = MLP(cfg)
  params = _init(mlp, x)
  assert set(params) == {"wi", "wi_gate", "wo"}
  want = _mlp(x.astype(np.float64), jax.tree.map(lambda a: np.asarray(a, np.float64), params), cfg)
  np.testing.assert_allclose(np.asarray(mlp.apply({"params": params}, x)), want, atol=2e-5)


def test_the_defaults_are_the_librarys_own_architecture_and_bad_values_are_named():
  fields = {f.name: f.default for f in dataclasses.fields(TransformerConfig)}
  assert {k: fields[k] for k in ARCHITECTURE_DEFAULTS} == ARCHITECTURE_DEFAULTS
  for field, value in (("activation", "gelu_new"), ("norm_position", "sandwich"), ("mlm_head", "tied")):
    with pytest.raises(ValueError, match=f"model.{field} must be one of"):
      dataclasses.replace(CFG, **{field: value})


def test_a_run_saved_before_the_options_resumes_and_one_with_another_option_does_not():
  config = base_config()
  saved = config_to_dict(config)
  for name in ARCHITECTURE_DEFAULTS:
    del saved["model"][name]  # as a checkpoint written before the options existed
  check_resume_compatible(saved, config, step=10)  # no error
  config.model.bias = True
  with pytest.raises(ValueError, match=r"model\.bias: False -> True"):
    check_resume_compatible(saved, config, step=10)
