"""What a modality contributes to a model: how its batch becomes tokens, and its heads.

A modality is a small frozen (hashable) description with two methods, both called inside
a Linen module's compact method so the submodules they create belong to that module:

  encode(cfg, example, train)  -> Encoded(tokens [B, T, D], mask [B, T], positions [B, T], extra)
  heads(cfg, hidden, encoded, example, train, prefix) -> the modality's output dict

The single-modality models (`model.py`) put one transformer between the two; the
multimodal model (`fusion.py`) puts per-modality towers and a fusion block there. Both
return the same per-modality output dicts, so the pre-training objectives of each
modality serve either unchanged. `prefix` names the heads apart when several modalities
share one module ("" keeps the single-modality names, e.g. "code_head").

This module holds the shared pieces and `TokenModality` (token sequences: EHR, expression,
DNA/protein); a modality with its own shape of input keeps its description in its folder
(`modalities/imaging/model.py`, `modalities/tabular/model.py`), registered in
`modalities/registry.py`. Every description also says what its encoder costs
(`num_tokens`, `encoded_tokens`, `head_output_dim`, `extra_flops`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple, Protocol

import jax
import jax.numpy as jnp

from biofm_jax.data import batch as B
from biofm_jax.data.masking import gathers, masked_slots
from biofm_jax.models.encoders.tokens import TokenEncoder
from biofm_jax.models.heads import TokenClassifier
from biofm_jax.models.layers import TransformerConfig
from biofm_jax.models.transformer import flops_per_token


class Encoded(NamedTuple):
  tokens: jax.Array  # [B, T, D]
  mask: jax.Array  # bool [B, T]: real tokens
  positions: jax.Array  # int32 [B, T]
  extra: Any = None  # what the heads need besides the hidden states (imaging: the patches)
  segments: Any = None  # int32 [B, T] segment ids of packed rows (`data/packing.py`); None: one per row
  prefix_tokens: int = 0  # tokens before the content's own (a ViT's CLS): heads read the content after them


class ModelDescription(Protocol):
  """What a modality contributes to a model (see the module docstring), and what it costs."""

  @property
  def name(self) -> str:
    ...

  def encode(self, cfg: TransformerConfig, example: Mapping[str, jax.Array], *, train: bool) -> Encoded:
    ...

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example: Any, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    ...

  def num_tokens(self) -> int:
    """Token slots of one example (what the batch holds)."""
    ...

  def encoded_tokens(self) -> int:
    """Tokens the encoder hands to the transformer in pre-training."""
    ...

  def head_output_dim(self) -> int:
    """Output width of the heads that run at every position."""
    ...

  def extra_flops(self, encoder_dim: int) -> float:
    """Training FLOPs per example beyond the transformer and its per-position heads."""
    ...


def masked_mean(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T, D] -> [B, D] float32 mean over the real tokens (0 where there are none)."""
  weights = mask.astype(jnp.float32)[..., None]
  return (hidden.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)


def token_summaries(hidden: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """A token sequence's [B, D] float32 summaries, each an output a task head can read
  (`task.embedding`): "embedding", the mean over real tokens (the default); "cls_embedding",
  the first token's state (CLS); "last_embedding", the last real token's (all a causal
  model has read)."""
  last = jnp.maximum(mask.sum(1) - 1, 0)
  return {"embedding": masked_mean(hidden, mask), "cls_embedding": hidden[:, 0].astype(jnp.float32),
          "last_embedding": jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0].astype(jnp.float32)}


@dataclasses.dataclass(frozen=True)
class TokenModality:
  """Token sequences (EHR timelines, expression profiles, DNA/protein); `encoder` embeds
  them (the EHR modality's adds age and time features)."""
  name: str
  vocab_size: int
  num_value_bins: int
  max_len: int
  position: str = "rope"  # what the modality's own tokens need: rope or learned
  encoder: Any = TokenEncoder  # a Linen module class: (cfg, vocab_size, num_value_bins) -> tokens, mask, positions
  time_classes: int = 0  # > 0: a head for the gap to the next event (next-event models that generate)
  # > 0: under masked modelling (targets in the batch) the code and value heads run at this
  # many gathered positions per row, not all (`objectives/masked.py`).
  prediction_slots: int = 0

  def encode(self, cfg: TransformerConfig, example: Mapping[str, jax.Array], *, train: bool) -> Encoded:
    tokens, mask, positions = self.encoder(cfg, self.vocab_size, self.num_value_bins,
                                      name=f"{self.name}_encoder")(example, train=train)
    return Encoded(tokens, mask, positions, segments=example.get(B.SEGMENT_IDS))

  def heads(self, cfg: TransformerConfig, hidden: jax.Array, encoded: Encoded, example: Any, *, train: bool,
            prefix: str = "") -> dict[str, jax.Array]:
    del train
    out = {"hidden": hidden, "mask": encoded.mask, **token_summaries(hidden, encoded.mask)}
    at = hidden
    if B.TARGET_MASK in example and gathers(self.prediction_slots, hidden.shape[1]):
      index, _ = masked_slots(example[B.TARGET_MASK], self.prediction_slots)
      at = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [B, P, D]
    out["code_logits"] = TokenClassifier(cfg, self.vocab_size, transform=cfg.mlm_head == "transform",
                                         name=f"{prefix}code_head")(at)
    if self.num_value_bins:
      out["value_logits"] = TokenClassifier(cfg, self.num_value_bins + 1, class_axis=None,
                                            name=f"{prefix}value_head")(at)
    if self.time_classes:
      out["time_logits"] = TokenClassifier(cfg, self.time_classes, class_axis=None, name=f"{prefix}time_head")(hidden)
    return out

  def num_tokens(self) -> int:
    return self.max_len

  def encoded_tokens(self) -> int:
    """Tokens the encoder hands to the transformer in pre-training."""
    return self.max_len

  def _token_head_dim(self) -> int:
    return self.vocab_size + (self.num_value_bins + 1 if self.num_value_bins else 0)

  def head_output_dim(self) -> int:
    """Output width of the heads that run at every position."""
    slotted = gathers(self.prediction_slots, self.encoded_tokens())
    return (0 if slotted else self._token_head_dim()) + self.time_classes

  def extra_flops(self, encoder_dim: int) -> float:
    """Training FLOPs per example of the heads run at the prediction slots only."""
    if not gathers(self.prediction_slots, self.encoded_tokens()):
      return 0.0
    return 3.0 * self.prediction_slots * 2 * encoder_dim * self._token_head_dim()


def encoder_flops(modality: ModelDescription, cfg: TransformerConfig) -> float:
  """Training FLOPs per example of a modality's transformer over its tokens, with its heads."""
  tokens = modality.encoded_tokens()
  flops = float(tokens * flops_per_token(cfg, tokens, output_dim=modality.head_output_dim()))
  return flops + modality.extra_flops(cfg.embed_dim)
