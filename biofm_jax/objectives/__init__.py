"""Pre-training objectives shared by modalities (one file per family) and the `Objective`
protocol. Which objective a modality trains with is its registry row's business
(`modalities/registry.py`: `build_objective`); objectives a single modality owns live in
its folder (e.g. `modalities/imaging/mae.py`)."""
from __future__ import annotations

from biofm_jax.objectives.base import Evaluation, Objective, ObjectiveDefaults, means, weighted_loss
from biofm_jax.objectives.multimodal import MultimodalObjective

__all__ = ["Evaluation", "MultimodalObjective", "Objective", "ObjectiveDefaults", "means", "weighted_loss"]
