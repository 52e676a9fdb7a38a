"""The multimodal pre-training objective: each modality's own objective, plus contrastive
alignment between pairs of modalities, summed with weights from the config.

Terms keep their (sum, count) form under a prefix: `ehr/code_loss`, `imaging/mae_loss`,
`contrastive/ehr_imaging_contrastive`, ... A subject without a modality carries that
modality's padding example (see `data/batch.py`), whose targets are empty, so it adds
nothing to that modality's sums or counts; the contrastive terms exclude subjects missing
either side of a pair through the batch's `present` flags.

A batch may leave a modality out altogether (batching by availability pattern,
`data/pattern_batches.py`): its terms, and those of contrastive pairs it takes part in,
are then absent from that step's sums and counts. They add nothing to the loss
(`base.weighted_loss`), and the step's metrics do not report a false 0 for them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from biofm_jax.objectives.base import Evaluation, Objective, ObjectiveDefaults
from biofm_jax.objectives.contrastive import ContrastiveAlignment, pairs_of_configured_modalities

CONTRASTIVE = "contrastive"


@dataclasses.dataclass(frozen=True)
class MultimodalObjective(ObjectiveDefaults):
  """`parts`: (modality, objective, weight) per modality; `contrastive`: None or an objective."""
  parts: tuple[tuple[str, Objective, float], ...]
  contrastive: Any = None
  name: str = "multimodal"

  def _members(self):
    members = [(modality, objective, weight) for modality, objective, weight in self.parts]
    if self.contrastive is not None:
      members.append((CONTRASTIVE, self.contrastive, 1.0))  # its weight is inside its loss_weights
    return members

  @property
  def loss_weights(self) -> dict[str, float]:
    return {f"{prefix}/{term}": weight * w for prefix, objective, weight in self._members()
            for term, w in objective.loss_weights.items() if weight * w}

  def _held(self, batch):
    """The members whose modality the batch holds (the contrastive one decides per pair)."""
    return [(prefix, objective) for prefix, objective, _ in self._members()
            if prefix in batch or prefix == CONTRASTIVE]

  def counts(self, batch) -> dict:
    return {f"{prefix}/{term}": value for prefix, objective in self._held(batch)
            for term, value in objective.counts(batch).items()}

  def sums(self, outputs, batch) -> dict:
    return {f"{prefix}/{term}": value for prefix, objective in self._held(batch)
            for term, value in objective.sums(outputs, batch).items()}

  def derived_metrics(self, means: Mapping[str, float]) -> dict[str, float]:
    """Each member's figures from its own terms, under its prefix."""
    out = {}
    for prefix, objective, _ in self._members():
      own = {term[len(prefix) + 1:]: value for term, value in means.items() if term.startswith(f"{prefix}/")}
      out.update({f"{prefix}/{name}": value for name, value in objective.derived_metrics(own).items()})
    return out

  def final_evaluations(self) -> Sequence[Evaluation]:
    return tuple(evaluation for _, objective, _ in self._members() for evaluation in objective.final_evaluations())


def build_multimodal_objective(cfg, info: Mapping[str, Mapping[str, Any]], build_one) -> MultimodalObjective:
  """`cfg` is config.objective: a section per modality (its own objective's fields plus
  `weight`) and a `contrastive` section; `build_one(section, modality, info)` builds one."""
  parts = []
  for modality in sorted(info):
    if modality not in cfg:
      raise ValueError(f"objective.{modality} is missing: the multimodal objective needs a section per "
                       f"modality ({sorted(info)}), with its objective's name and weight")
    section = cfg[modality]
    objective = build_one(section, modality, info[modality])
    if objective.causal:
      raise ValueError(f"objective.{modality}.name: {section.name!r} needs a causal model; the multimodal "
                       f"towers and fusion are bidirectional: use 'masked'")
    parts.append((modality, objective, float(section.get("weight", 1.0))))
  contrastive = None
  section = cfg.get(CONTRASTIVE)
  if section is not None and section.weight > 0:
    pairs = pairs_of_configured_modalities(section.pairs, info)
    contrastive = ContrastiveAlignment(pairs=pairs, loss=section.loss, weight=float(section.weight))
  return MultimodalObjective(tuple(parts), contrastive)
