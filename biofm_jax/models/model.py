"""Builds the pre-training model from a config: modality encoder -> transformer -> heads.

`build_model(config, modalities)` takes each modality's model description (built from the
data module's `model_info()` by the modality registry, `modalities/registry.py`): one
modality gives a `SingleModalityModel`; several give the multimodal model of `fusion.py`.
Every model returns a dict per modality, so objectives find what they need by name, and
reports its analytic cost for MFU, e.g.

    {"ehr": {"hidden": [B, L, D], "embedding": [B, D], "code_logits": [B, L, V], "value_logits": [B, L, K+1]}}
    {"imaging": {"hidden": [B, T, D], "embedding": [B, D],
                 "predicted_patches": [B, M, P], "target_patches": [B, M, P]}}
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections

from biofm_jax.models.fusion import build_multimodal_model
from biofm_jax.models.layers import TransformerConfig, transformer_config
from biofm_jax.models.description import encoder_flops
from biofm_jax.models.transformer import TransformerStack


class SingleModalityModel(nn.Module):
  """One modality's encoder -> the shared transformer stack -> that modality's heads.

  Token sequences embed as the mean of their real tokens' final hidden states, images as
  the mean over patches, table rows as the CLS token's state (see each modality's model).
  """
  cfg: TransformerConfig
  modality: Any  # a modality's model description (models/description.py)

  @nn.compact
  def __call__(self, batch: Mapping[str, Mapping[str, jax.Array]], *, train: bool = False, cache=None,
               slot=None, cache_mask=None, positions=None):
    """The outputs; or, decoding a causal model (`generate.py`), with `cache` (per layer or
    stacked: `models/transformer.py`), `slot` (where the batch's tokens go), `cache_mask` ([B, S]
    real slots, the new ones included) and the tokens' `positions`: (outputs, cache)."""
    example = batch[self.modality.name]
    encoded = self.modality.encode(self.cfg, example, train=train)
    stack = TransformerStack(self.cfg, name="transformer")
    if cache is None:
      hidden = stack(encoded.tokens, encoded.mask, encoded.positions, train=train, segments=encoded.segments)
    else:
      hidden, cache = stack(encoded.tokens, cache_mask, positions, train=False, cache=cache, slot=slot)
    outputs = {self.modality.name: self.modality.heads(self.cfg, hidden, encoded, example, train=train)}
    return outputs if cache is None else (outputs, cache)

  def tokens_per_example(self, modalities: Sequence[str] | None = None) -> int:
    """Token slots of one example (`modalities`: those a batch holds, as the multimodal
    model takes them; a single-modality batch always holds its one)."""
    del modalities
    return self.modality.num_tokens()

  def flops_per_example(self, modalities: Sequence[str] | None = None) -> float:
    del modalities
    return encoder_flops(self.modality, self.cfg)


def build_single_modality_model(config: ml_collections.ConfigDict, modality: Any, *,
                                causal: bool = False) -> SingleModalityModel:
  cfg = transformer_config(config.model, max_len=modality.num_tokens(), causal=causal)
  return SingleModalityModel(cfg, modality)


def build_model(config: ml_collections.ConfigDict, modalities: Mapping[str, Any], *, causal: bool = False) -> nn.Module:
  """One modality's description gives a single-modality model (with a causal stack where
  its objective needs one, `causal`); several give the multimodal model of `fusion.py`,
  with the fusion that `config.model.fusion` names."""
  if not modalities:
    raise ValueError("build_model: no modality to build a model for")
  if len(modalities) == 1:
    return build_single_modality_model(config, *modalities.values(), causal=causal)
  return build_multimodal_model(config, dict(modalities))
