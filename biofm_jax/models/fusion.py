"""The multimodal model: per-modality towers, a fusion block chosen in the config, heads.

    batch[m] --encode--> tokens --tower (model.fusion.modality_layers)--> hidden_m
    fusion over every hidden_m:  early | bottleneck | late
    heads of each modality (its pre-training objective) and the fused embedding

- early: all modalities' tokens, each with a learned modality-type embedding, in one
  transformer (`model.num_layers` blocks); a token of an absent modality is masked as a
  key, so nothing attends to it. Token positions are the towers' business (the fusion
  block sees modality-typed tokens): with `modality_layers` 0, use `model.position`
  "learned" so token sequences keep their order.
- bottleneck: `model.fusion.num_latents` learned latents cross-attend to the tokens of
  the present modalities and attend to each other (Perceiver-style), `model.num_layers`
  times; each modality's tokens then read the latents back (one cross-attention block)
  before their heads.
- late: each tower is pooled to one embedding per modality; a learned query attends over
  the present modalities' embeddings (attention pooling). Heads read the towers directly.

Absent modalities (batch[m]["present"] False, or m not in the batch at all) are masked
out of every attention and every pooling, so the fused result equals that of a model
given only the present modalities. A slot that is in the batch is computed even when
absent (shapes are static under jit, and XLA cannot skip work per example): it costs
compute, never information. A modality left out of the batch costs nothing; batching
by availability pattern (`data/pattern_batches.py`) leaves out every absent one.

Outputs: `{m: <m's head outputs, as in model.py>, "fused": {"embedding": [B, D]},
"contrastive": {m: [B, P] projections of the towers' pooled outputs, "logit_scale",
"logit_bias"}}`. The contrastive projections read the towers, before any fusion: a
subject's EHR embedding must not see its image when it is asked to find that image.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.models.layers import (MLP, ACTIVATION_AXES, Block, TransformerConfig, embed_init, kernel_init, make_norm,
                                     transformer_config)
from biofm_jax.models.description import Encoded, encoder_flops, masked_mean
from biofm_jax.models.transformer import TransformerStack, flops_per_token

FUSIONS = ("early", "bottleneck", "late")
# Initial contrastive temperatures and biases: CLIP's 1/0.07, SigLIP's t = 10, b = -10.
CONTRASTIVE_INIT = {"clip": (math.log(1 / 0.07), 0.0), "siglip": (math.log(10.0), -10.0)}
MAX_LOGIT_SCALE = math.log(100.0)


class CrossAttention(nn.Module):
  """Queries from `x` attend to the real tokens of `context`."""
  cfg: TransformerConfig

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    cfg = self.cfg
    def projection(name):
      return nn.DenseGeneral((cfg.num_heads, cfg.kv_dim), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             kernel_init=kernel_init(("embed", "heads", "kv")), use_bias=False, name=name)
    q, k, v = projection("query")(x), projection("key")(context), projection("value")(context)
    out = jax.nn.dot_product_attention(q, k, v, mask=context_mask[:, None, None, :])
    return nn.DenseGeneral(cfg.embed_dim, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           kernel_init=kernel_init(("heads", "kv", "embed")), use_bias=False, name="out")(out)


class CrossBlock(nn.Module):
  """A pre-norm cross-attention block: x += attend(x -> context); x += MLP(x)."""
  cfg: TransformerConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array) -> jax.Array:
    cfg = self.cfg
    drop = nn.Dropout(cfg.dropout_rate, deterministic=self.deterministic)
    x = nn.with_logical_constraint(x, ACTIVATION_AXES)
    context = make_norm(cfg, "context_norm")(context)
    x = x + drop(CrossAttention(cfg, name="attention")(make_norm(cfg, "attention_norm")(x), context, context_mask))
    x = x + drop(MLP(cfg, name="mlp")(make_norm(cfg, "mlp_norm")(x)))
    return nn.with_logical_constraint(x, ACTIVATION_AXES)


@dataclasses.dataclass(frozen=True)
class Tower:
  """One modality after its tower: what fusion and the heads read."""
  encoded: Encoded  # mask already excludes absent examples
  hidden: jax.Array  # [B, T, D]
  present: jax.Array  # bool [B]

  @property
  def pooled(self) -> jax.Array:
    return masked_mean(self.hidden, self.encoded.mask)


class MultimodalModel(nn.Module):
  """Per-modality towers, then early, bottleneck or late fusion (see the module docstring)."""
  modalities: tuple  # of modality descriptions (description.py), in a fixed order
  tower_cfgs: tuple  # of TransformerConfig, one per modality (its num_layers may be 0)
  fusion_cfg: TransformerConfig
  fusion: str = "early"
  num_latents: int = 16
  projection_dim: int = 0  # 0: no contrastive projections
  logit_scale_init: float = CONTRASTIVE_INIT["siglip"][0]
  logit_bias_init: float = CONTRASTIVE_INIT["siglip"][1]

  @nn.compact
  def __call__(self, batch: Mapping[str, Mapping[str, jax.Array]], *, train: bool = False):
    if self.fusion not in FUSIONS:
      raise ValueError(f"model.fusion.type must be one of {FUSIONS}, got {self.fusion!r}")
    active = [i for i, m in enumerate(self.modalities) if m.name in batch]
    if not active:
      raise ValueError(f"the batch has none of the model's modalities {[m.name for m in self.modalities]}")
    towers = {i: self._tower(i, batch[self.modalities[i].name], train) for i in active}
    fused, hidden = getattr(self, f"_{self.fusion}_fusion")(towers, train)
    out: dict[str, Any] = {"fused": {"embedding": fused}}
    for i, tower in towers.items():
      m = self.modalities[i]
      out[m.name] = m.heads(self.tower_cfgs[i], hidden[i], tower.encoded, batch[m.name], train=train,
                            prefix=f"{m.name}_")
    if self.projection_dim:
      out["contrastive"] = self._projections(towers)
    return out

  # ------------------------------------------------------------------ towers
  def _tower(self, i: int, example: Mapping[str, jax.Array], train: bool) -> Tower:
    m, cfg = self.modalities[i], self.tower_cfgs[i]
    encoded = m.encode(cfg, example, train=train)
    present = example.get(B.PRESENT)
    present = jnp.ones(encoded.mask.shape[:1], jnp.bool_) if present is None else present.astype(jnp.bool_)
    encoded = encoded._replace(mask=encoded.mask & present[:, None])
    hidden = encoded.tokens
    if cfg.num_layers:
      hidden = TransformerStack(cfg, name=f"{m.name}_tower")(hidden, encoded.mask, encoded.positions, train=train)
    return Tower(encoded, hidden, present)

  def _modality_embedding(self) -> jax.Array:
    cfg = self.fusion_cfg
    return self.param("modality_embedding", embed_init((None, "embed")), (len(self.modalities), cfg.embed_dim),
                      cfg.param_dtype).astype(cfg.dtype)

  def _mean_over_present(self, towers: Mapping[int, Tower], pooled: Mapping[int, jax.Array]) -> jax.Array:
    """The mean of the present modalities' embeddings: each modality counts once."""
    weights = {i: t.present.astype(jnp.float32)[:, None] for i, t in towers.items()}
    total = sum(pooled[i].astype(jnp.float32) * weights[i] for i in towers)
    return total / jnp.maximum(sum(weights.values()), 1.0)

  # ------------------------------------------------------------------ fusions
  def _early_fusion(self, towers: Mapping[int, Tower], train: bool):
    types = self._modality_embedding()
    order = sorted(towers)
    tokens = jnp.concatenate([towers[i].hidden + types[i] for i in order], axis=1)
    mask = jnp.concatenate([towers[i].encoded.mask for i in order], axis=1)
    positions = jnp.concatenate([towers[i].encoded.positions for i in order], axis=1)
    joint = TransformerStack(self.fusion_cfg, name="fusion")(tokens, mask, positions, train=train)
    hidden, start = {}, 0
    for i in order:
      length = towers[i].hidden.shape[1]
      hidden[i], start = joint[:, start:start + length], start + length
    pooled = {i: masked_mean(hidden[i], towers[i].encoded.mask) for i in order}
    return self._mean_over_present(towers, pooled), hidden

  def _bottleneck_fusion(self, towers: Mapping[int, Tower], train: bool):
    cfg, order = self.fusion_cfg, sorted(towers)
    types = self._modality_embedding()
    context = jnp.concatenate([towers[i].hidden + types[i] for i in order], axis=1)
    context_mask = jnp.concatenate([towers[i].encoded.mask for i in order], axis=1)
    batch_size = context.shape[0]
    latents = self.param("latents", embed_init((None, "embed")), (self.num_latents, cfg.embed_dim), cfg.param_dtype)
    x = jnp.broadcast_to(latents.astype(cfg.dtype)[None], (batch_size,) + latents.shape)
    latent_mask = jnp.ones(x.shape[:2], jnp.bool_)
    latent_positions = jnp.zeros(x.shape[:2], jnp.int32)
    for layer in range(cfg.num_layers):
      x = CrossBlock(cfg, deterministic=not train, name=f"fusion_cross_{layer}")(x, context, context_mask)
      x, _ = Block(cfg, deterministic=not train, name=f"fusion_self_{layer}")(x, latent_mask, latent_positions)
    x = make_norm(cfg, "fusion_norm")(x)
    hidden = {i: CrossBlock(cfg, deterministic=not train, name=f"{self.modalities[i].name}_readout")(
        towers[i].hidden, x, latent_mask) for i in order}
    # Subjects with no modality at all (evaluation padding) get a zero embedding.
    anything = jnp.stack([towers[i].present for i in order], axis=1).any(axis=1)
    return x.astype(jnp.float32).mean(axis=1) * anything[:, None], hidden

  def _late_fusion(self, towers: Mapping[int, Tower], train: bool):
    del train
    cfg, order = self.fusion_cfg, sorted(towers)
    types = self._modality_embedding()
    pooled = jnp.stack([towers[i].pooled.astype(cfg.dtype) + types[i] for i in order], axis=1)  # [B, M, D]
    present = jnp.stack([towers[i].present for i in order], axis=1)  # [B, M]
    pooled = make_norm(cfg, "fusion_norm")(pooled)
    def projection(name):
      return nn.DenseGeneral((cfg.num_heads, cfg.kv_dim), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                             kernel_init=kernel_init(("embed", "heads", "kv")), use_bias=False, name=name)
    query = self.param("fusion_query", embed_init(("heads", "kv")), (cfg.num_heads, cfg.kv_dim), cfg.param_dtype)
    query = jnp.broadcast_to(query.astype(cfg.dtype), (pooled.shape[0], 1) + query.shape)
    attended = jax.nn.dot_product_attention(query, projection("fusion_key")(pooled),
                                            projection("fusion_value")(pooled), mask=present[:, None, None, :])
    fused = nn.DenseGeneral(cfg.embed_dim, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            kernel_init=kernel_init(("heads", "kv", "embed")), use_bias=False,
                            name="fusion_out")(attended)[:, 0]
    fused = fused.astype(jnp.float32) * present.any(axis=1)[:, None]
    return fused, {i: towers[i].hidden for i in order}

  # ------------------------------------------------------------------ contrastive
  def _projections(self, towers: Mapping[int, Tower]) -> dict[str, jax.Array]:
    out = {}
    for i, tower in towers.items():
      name = self.modalities[i].name
      out[name] = nn.Dense(self.projection_dim, dtype=jnp.float32, param_dtype=self.fusion_cfg.param_dtype,
                           kernel_init=kernel_init(("embed", None)), use_bias=False,
                           name=f"{name}_projection")(tower.pooled)
    scalar = lambda value: nn.with_logical_partitioning(nn.initializers.constant(value), ())  # noqa: E731
    # Capped at a multiplier of 100 (as OpenCLIP does): a larger one destabilises training.
    # The cap is straight-through, so a parameter above it still gets gradients and can return.
    scale = self.param("logit_scale", scalar(self.logit_scale_init), (), jnp.float32)
    out["logit_scale"] = scale + jax.lax.stop_gradient(jnp.minimum(scale, MAX_LOGIT_SCALE) - scale)
    out["logit_bias"] = self.param("logit_bias", scalar(self.logit_bias_init), (), jnp.float32)
    return out

  # ------------------------------------------------------------------ cost
  def _selected(self, modalities) -> list[int]:
    """Indices of `modalities` (names; None: all) among the model's."""
    names = [m.name for m in self.modalities]
    unknown = sorted(set(modalities or ()) - set(names))
    if unknown:
      raise ValueError(f"the multimodal model has no modalities {unknown}; it has {names}")
    return [i for i, name in enumerate(names) if modalities is None or name in modalities]

  def tokens_per_example(self, modalities=None) -> int:
    """Token slots of an example holding `modalities` (None: all of the model's)."""
    return sum(self.modalities[i].num_tokens() for i in self._selected(modalities))

  def flops_per_example(self, modalities=None) -> float:
    """Towers with their heads, plus the fusion block (matmuls only, forward + backward),
    for an example holding `modalities` (None: all): a batch that leaves a modality out
    (batching by availability pattern) does not compute it."""
    chosen = self._selected(modalities)
    towers = sum(encoder_flops(self.modalities[i], self.tower_cfgs[i]) for i in chosen)
    cfg, d = self.fusion_cfg, self.fusion_cfg.embed_dim
    tokens = sum(self.modalities[i].encoded_tokens() for i in chosen)
    h = cfg.num_heads * cfg.kv_dim
    if self.fusion == "early":
      fusion = tokens * flops_per_token(cfg, tokens, output_dim=0)
    elif self.fusion == "bottleneck":
      n = self.num_latents
      latent_layers = n * flops_per_token(cfg, n, output_dim=0)
      cross = 3 * cfg.num_layers * 2 * (2 * tokens * d * h + 2 * n * d * h + 2 * n * tokens * h
                                        + 2 * n * d * cfg.mlp_dim)
      readout = 3 * 2 * (2 * tokens * d * h + 2 * n * d * h + 2 * tokens * n * h + 2 * tokens * d * cfg.mlp_dim)
      fusion = latent_layers + cross + readout
    else:
      fusion = 3 * 2 * len(chosen) * 3 * d * h
    return towers + fusion + 3 * 2 * len(chosen) * d * self.projection_dim


def build_multimodal_model(config: ml_collections.ConfigDict, modalities: Mapping[str, Any]) -> MultimodalModel:
  """Towers take `model.fusion.modality_layers` blocks; the fusion block `model.num_layers`."""
  fusion_cfg_dict = config.model.fusion
  order = tuple(sorted(modalities))
  tower_cfgs = tuple(transformer_config(config.model, max_len=modalities[name].num_tokens(), causal=False,
                                        num_layers=fusion_cfg_dict.modality_layers,
                                        position=_tower_position(modalities[name], config.model.position))
                     for name in order)
  total = sum(modalities[name].encoded_tokens() for name in order)
  # Positions live in the towers (each modality's own kind); the fusion block sees a set
  # of modality-typed tokens, since positions of different modalities are not comparable.
  fusion_cfg = transformer_config(config.model, max_len=max(total, fusion_cfg_dict.num_latents), causal=False,
                                  position="none")
  contrastive = config.objective.get("contrastive")
  loss = contrastive.loss if contrastive is not None and contrastive.weight > 0 else None
  if loss and not fusion_cfg_dict.projection_dim:
    raise ValueError("model.fusion.projection_dim is 0 while objective.contrastive.weight > 0: contrastive "
                     "alignment needs projections; set projection_dim or the contrastive weight to 0")
  scale, bias = CONTRASTIVE_INIT.get(loss, CONTRASTIVE_INIT["siglip"])
  return MultimodalModel(tuple(modalities[name] for name in order), tower_cfgs, fusion_cfg,
                         fusion=fusion_cfg_dict.type, num_latents=fusion_cfg_dict.num_latents,
                         projection_dim=fusion_cfg_dict.projection_dim if loss else 0,
                         logit_scale_init=scale, logit_bias_init=bias)


def _tower_position(modality, configured: str) -> str:
  """Each modality keeps the positions its encoder needs, whatever the fused stack uses."""
  natural = modality.position
  if natural == "rope":  # token sequences: rope or learned, as configured
    return configured if configured in ("rope", "learned") else "rope"
  if natural == "sincos":  # images: fixed sin-cos or learned patch positions
    return "learned" if configured == "learned" else "sincos"
  return natural
