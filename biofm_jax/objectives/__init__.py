"""Pre-training objectives, one file per family, and the registry that names them."""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from biofm_jax.objectives.autoregressive import NextEventModelling
from biofm_jax.objectives.base import Objective, means, weighted_loss
from biofm_jax.objectives.mae import MaskedAutoencoding
from biofm_jax.objectives.masked import MaskedCodeModelling
from biofm_jax.objectives.masked_features import MaskedFeatureModelling
from biofm_jax.objectives.multimodal import MultimodalObjective, build_multimodal_objective

OBJECTIVES = {
    "masked": lambda cfg, modality, info: MaskedCodeModelling(
        modality=modality, code_loss_weight=cfg.get("code_loss_weight", 1.0),
        value_loss_weight=cfg.get("value_loss_weight", 0.0), has_values=info.get("num_value_bins", 0) > 0),
    "autoregressive": lambda cfg, modality, info: NextEventModelling(modality=modality),
    "mae": lambda cfg, modality, info: MaskedAutoencoding(norm_pix_loss=cfg.norm_pix_loss),
    "masked_features": lambda cfg, modality, info: MaskedFeatureModelling(
        category_loss_weight=cfg.category_loss_weight),
}


def build_objective(cfg: ml_collections.ConfigDict, modality: str = "ehr",
                    info: Mapping[str, Any] | None = None) -> Objective:
  """The objective `cfg.name` for `modality`; `info` is the data module's `model_info()`
  (for "multimodal": one `model_info()` per modality, and a section of `cfg` per modality)."""
  if cfg.name == "multimodal":  # `info` is {modality: model_info}
    return build_multimodal_objective(cfg, info or {}, build_objective)
  if cfg.name not in OBJECTIVES:
    raise ValueError(f"objective.name={cfg.name!r} is not one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[cfg.name](cfg, modality, dict(info if info is not None else {"num_value_bins": 1}))


__all__ = ["OBJECTIVES", "MultimodalObjective", "Objective", "build_objective", "means", "weighted_loss"]
