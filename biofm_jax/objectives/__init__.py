"""Pre-training objectives, one file per family, and the registry that names them."""
from __future__ import annotations

import ml_collections

from biofm_jax.objectives.autoregressive import NextEventModelling
from biofm_jax.objectives.base import Objective, means, weighted_loss
from biofm_jax.objectives.mae import MaskedAutoencoding
from biofm_jax.objectives.masked import MaskedCodeModelling

OBJECTIVES = {
    "masked": lambda cfg: MaskedCodeModelling(value_loss_weight=cfg.value_loss_weight),
    "autoregressive": lambda cfg: NextEventModelling(),
    "mae": lambda cfg: MaskedAutoencoding(norm_pix_loss=cfg.norm_pix_loss),
}


def build_objective(cfg: ml_collections.ConfigDict) -> Objective:
  if cfg.name not in OBJECTIVES:
    raise ValueError(f"objective.name={cfg.name!r} is not one of {sorted(OBJECTIVES)}")
  return OBJECTIVES[cfg.name](cfg)


__all__ = ["OBJECTIVES", "Objective", "build_objective", "means", "weighted_loss"]
