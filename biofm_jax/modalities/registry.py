"""The one table of modalities: what each registered modality brings, by name.

Shared code (the training loop, preparation, the model builder, the objective lookup,
ahead-of-time sizing, record-label evaluation) reads this table and knows no modality by
name. A row (`Modality`) names:

  data        from_config(cfg, *, objective, artifacts_dir) -> the data module
  model       (config, model_info) -> the modality's model description (encoder and heads)
  objectives  {objective name: (objective cfg, modality name, model_info) -> Objective}: the
              pre-training objectives this modality trains with
  sizing      (data cfg, objective name, vocab_size) -> a data module that reads nothing
              (`data.module.ShapesOnly`, or the modality's own where it can open without
              data): its specs, model info and any device transform from the config
              alone, for `train/aot.py`; None when the data decides the shapes (gene
              panels, table columns)
  baseline    the classical model on raw features that record-label reports put beside
              the probe (`eval/record_tasks.py`); None where labels come from elsewhere
  reference_losses  (data module, config, train_split=, eval_split=) -> {name: loss} that
              a pre-trained model must beat, logged by the loop; None for none
  artifacts   the files its data module writes to a run's artifacts/ that a trained model
              needs (vocabularies, statistics): the only ones an export carries

Adding a modality: a folder `modalities/<name>/` with those pieces, and one row below.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.data.module import ShapesOnly
from biofm_jax.data.multimodal import MultimodalData
from biofm_jax.modalities import synthetic_cohort
from biofm_jax.modalities.ecg import baseline as ecg_baseline
from biofm_jax.modalities.ecg import data as ecg_data
from biofm_jax.modalities.ecg import model as ecg_model
from biofm_jax.modalities.ecg.mae import ECGReconstruction
from biofm_jax.modalities.ehr import data as ehr_data
from biofm_jax.modalities.ehr import model as ehr_model
from biofm_jax.modalities.ehr import time_to_event as ehr_tte
from biofm_jax.modalities.ehr import unigram as ehr_unigram
from biofm_jax.modalities.imaging import data as imaging_data
from biofm_jax.modalities.imaging import model as imaging_model
from biofm_jax.modalities.imaging.mae import MaskedAutoencoding
from biofm_jax.modalities.omics import baseline as omics_baseline
from biofm_jax.modalities.omics import data as omics_data
from biofm_jax.modalities.sequence import data as sequence_data
from biofm_jax.modalities.tabular import baseline as tabular_baseline
from biofm_jax.modalities.tabular import data as tabular_data
from biofm_jax.modalities.tabular import model as tabular_model
from biofm_jax.modalities.tabular.masked_features import MaskedFeatureModelling
from biofm_jax.models import model as model_lib
from biofm_jax.models.modalities import TokenModality
from biofm_jax.objectives import Objective
from biofm_jax.objectives.autoregressive import NextEventModelling, check_gap_edges
from biofm_jax.objectives.contrastive import pairs_of_configured_modalities
from biofm_jax.objectives.masked import MaskedCodeModelling, prediction_slots
from biofm_jax.objectives.time_to_event import TimeToEventModelling, check_bin_starts
from biofm_jax.objectives.multimodal import build_multimodal_objective

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RawBaseline:
  """A classical model on a modality's raw features, for record-label reports."""
  name: str  # the report's name for it
  model: str  # `eval/classical.fit_predict`'s model name
  description: str
  features: Callable[[Any, Any], Any]  # (train source, source) -> [rows, features]


@dataclasses.dataclass(frozen=True)
class Modality:
  name: str
  data: Callable[..., Any]
  model: Callable[[ml_collections.ConfigDict, Mapping[str, Any]], Any]
  objectives: Mapping[str, Callable[..., Objective]]
  sizing: Callable[[Any, str, int], Any] | None = None
  baseline: RawBaseline | None = None
  reference_losses: Callable[..., dict[str, float]] | None = None
  artifacts: tuple[str, ...] = ()


# ---------------------------------------------------------------- shared pieces of rows
def _masked(cfg, modality, info) -> Objective:
  return MaskedCodeModelling(modality=modality, code_loss_weight=cfg.get("code_loss_weight", 1.0),
                             value_loss_weight=cfg.get("value_loss_weight", 0.0),
                             has_values=info.get("num_value_bins", 0) > 0,
                             prediction_slots=int(info.get("prediction_slots", 0)))


def _next_event(cfg, modality, info) -> Objective:
  del info
  return NextEventModelling(modality=modality, gap_edges=check_gap_edges(cfg.get("gap_edges_days", ())),
                            time_loss_weight=cfg.get("time_loss_weight", 1.0))


def _time_to_event(cfg, modality, info) -> Objective:
  if "tte_tasks" not in info:
    raise ValueError(f"objective.name='time_to_event': the {modality} data has no time-to-event targets")
  return TimeToEventModelling(modality=modality, num_tasks=int(info["tte_tasks"]), points=int(info["tte_points"]),
                              bin_starts=check_bin_starts(cfg.get("time_bins_days", (0.0,))))


def _token_model(name: str):
  def build(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> TokenModality:
    del config
    return TokenModality(name, vocab_size=info["vocab_size"], num_value_bins=info["num_value_bins"],
                         max_len=info["max_len"], prediction_slots=int(info.get("prediction_slots", 0)))
  return build


def _ehr_sizing(cfg, objective: str, vocab_size: int):
  tte = ehr_tte.settings_from_config(cfg)
  spec = ehr_data.training_example_spec(cfg.max_len, objective, bool(cfg.get("pack", False)), tte["events"])
  info = {"vocab_size": vocab_size, "num_value_bins": cfg.num_value_bins, "max_len": cfg.max_len}
  if objective == "masked":
    info["prediction_slots"] = prediction_slots(cfg.max_len, cfg.mask_rate)
  if objective == "time_to_event":
    info.update(tte_tasks=min(tte["tasks"], vocab_size - B.NUM_SPECIAL), tte_points=tte["points"])
  return ShapesOnly("ehr", spec, B.ehr_example_spec(cfg.max_len, with_targets=False), info)


def _sequence_sizing(cfg, objective: str, vocab_size: int):
  del objective, vocab_size  # the tokenizer fixes the vocabulary
  return ShapesOnly("sequence", B.token_sequence_spec(cfg.max_len, with_values=False, with_targets=True),
                    B.token_sequence_spec(cfg.max_len, with_values=False, with_targets=False),
                    {"vocab_size": sequence_data.tokenizer_from_config(cfg).vocab_size, "num_value_bins": 0,
                     "max_len": cfg.max_len, "prediction_slots": prediction_slots(cfg.max_len, cfg.mask_rate)})


def _imaging_sizing(cfg, objective: str, vocab_size: int):
  del vocab_size
  return imaging_data.ImagingData(None, imaging_data.ImagingSettings.from_config(cfg), objective=objective)


# ---------------------------------------------------------------- the table
MODALITIES: dict[str, Modality] = {m.name: m for m in (
    Modality("ehr", ehr_data.EHRData.from_config, ehr_model.model_modality,
             {"masked": _masked, "autoregressive": _next_event, "time_to_event": _time_to_event},
             sizing=_ehr_sizing,
             reference_losses=ehr_unigram.reference_losses,
             artifacts=(ehr_data.VOCAB_FILENAME, ehr_tte.TASKS_FILENAME)),
    Modality("imaging", imaging_data.ImagingData.from_config, imaging_model.model_modality,
             {"mae": lambda cfg, modality, info: MaskedAutoencoding(norm_pix_loss=cfg.norm_pix_loss)},
             sizing=_imaging_sizing),
    Modality("omics", omics_data.OmicsData.from_config, _token_model("omics"), {"masked": _masked},
             baseline=RawBaseline("l1_logistic_expression", "l1_logistic",
                                  "L1 logistic regression on normalised counts (log1p)",
                                  omics_baseline.expression_features),
             artifacts=(omics_data.VOCAB_FILENAME,)),
    Modality("sequence", sequence_data.SequenceData.from_config, _token_model("sequence"), {"masked": _masked},
             sizing=_sequence_sizing, artifacts=(sequence_data.TOKENIZER_FILENAME,)),
    Modality("tabular", tabular_data.TabularData.from_config, tabular_model.model_modality,
             {"masked_features": lambda cfg, modality, info: MaskedFeatureModelling(
                 category_loss_weight=cfg.category_loss_weight)},
             baseline=RawBaseline("logistic_raw_features", "logistic",
                                  "logistic regression on the raw features (mean-imputed, missing indicators, "
                                  "one-hot)", tabular_baseline.table_features),
             artifacts=(tabular_data.STATS_FILENAME,)),
    Modality("ecg", ecg_data.ECGData.from_config, ecg_model.model_modality,
             {"mae": lambda cfg, modality, info: ECGReconstruction(norm_pix_loss=cfg.norm_pix_loss)},
             sizing=ecg_data.sizing,
             baseline=RawBaseline("logistic_rhythm_features", "logistic",
                                  "logistic regression on RR-interval irregularity and per-lead amplitudes",
                                  ecg_baseline.rhythm_features)),
)}


# ---------------------------------------------------------------- lookups
def get(name: str) -> Modality:
  if name not in MODALITIES:
    raise ValueError(f"unknown modality {name!r}; registered: {sorted(MODALITIES)}")
  return MODALITIES[name]


def configured(data_config: Mapping[str, Any]) -> list[str]:
  """The registered modalities a `config.data` section configures, in the table's order."""
  return [name for name in MODALITIES if name in data_config]


def open_data_module(name: str, cfg: Any, *, objective: str, artifacts_dir) -> Any:
  return get(name).data(cfg, objective=objective, artifacts_dir=artifacts_dir)


def check_contrastive(objectives: Any, modalities: Sequence[str], *, mixing: bool, sampling: str) -> None:
  """Fails before any data is read when contrastive alignment cannot work as configured."""
  section = objectives.get("contrastive")
  if section is None or not section.weight > 0:
    return
  pairs_of_configured_modalities(section.pairs, modalities)
  if mixing:
    raise ValueError("data.multimodal.mix_weights mixes single-modality examples, so no example holds a "
                     "pair for objective.contrastive; set objective.contrastive.weight=0 or join by subject")
  if sampling == "balanced":
    log.warning("multimodal: balanced sampling repeats the subjects of rare availability patterns, so a "
                "batch can hold one subject twice and contrastive alignment then treats its second copy "
                "as a negative; prefer uniform sampling with large contrastive batches")


def open_multimodal_data(data_cfg: Any, *, objectives: Any, artifacts_dir, seed: int = 0):
  """The multimodal join (`data/multimodal.py`) of the modalities `data_cfg.multimodal` names."""
  return MultimodalData.from_config(data_cfg, objectives=objectives, artifacts_dir=artifacts_dir, seed=seed,
                                    open_modality=open_data_module, registered=tuple(MODALITIES),
                                    check_objectives=check_contrastive,
                                    synthetic_paths=synthetic_cohort.run_cohort_paths)


def model_artifact_files(artifacts_dir: str | os.PathLike) -> list[str]:
  """The files under a run's `artifacts_dir` that its model needs: each row's `artifacts`, at
  the top (a one-modality run) or under `<modality>/` (a multimodal join), where present.
  An export copies these and nothing else."""
  root = pathlib.Path(artifacts_dir)
  found = []
  for row in MODALITIES.values():
    for name in row.artifacts:
      found += [path for path in (name, f"{row.name}/{name}") if (root / path).is_file() or (root / path).is_symlink()]
  return found


def reference_losses(data_module, config, *, train_split: str, eval_split: str) -> dict[str, float]:
  """The losses `data_module`'s modality says a model must beat (`{}` for none, and for
  joined modalities)."""
  row = MODALITIES.get(data_module.name)
  if row is None or row.reference_losses is None:
    return {}
  return row.reference_losses(data_module, config, train_split=train_split, eval_split=eval_split)


def model_modalities(config: ml_collections.ConfigDict, data_info: Mapping[str, Mapping[str, Any]]) -> dict:
  """{modality: its model description} from each data module's `model_info()`."""
  return {name: get(name).model(config, info) for name, info in data_info.items()}


def build_model(config: ml_collections.ConfigDict, data_info: Mapping[str, Mapping[str, Any]]):
  """The pre-training model for `data_info` (`{modality: model_info}`, e.g.
  `{"ehr": {"vocab_size": ..., ...}}`): `models/model.py` over the registered descriptions."""
  if not data_info:
    raise ValueError(f"no model for modalities []; registered: {sorted(MODALITIES)}")
  unknown = sorted(set(data_info) - set(MODALITIES))
  if unknown:
    raise ValueError(f"no model for modalities {sorted(data_info)}; registered: {sorted(MODALITIES)}")
  return model_lib.build_model(config, model_modalities(config, data_info))


def objective_for(cfg: ml_collections.ConfigDict, info: Mapping[str, Mapping[str, Any]]) -> Objective:
  """The pre-training objective `cfg.name` for a data module whose `model_info()` is `info`
  (`{modality: model_info}`: one modality, or several for "multimodal")."""
  if cfg.name == "multimodal":
    return build_objective(cfg, "multimodal", info)
  if len(info) != 1:
    raise ValueError(f"objective.name={cfg.name!r} trains one modality; the data has {sorted(info)} "
                     f"(use the multimodal objective)")
  (modality, single), = info.items()
  return build_objective(cfg, modality, single)


def build_objective(cfg: ml_collections.ConfigDict, modality: str = "ehr",
                    info: Mapping[str, Any] | None = None) -> Objective:
  """The objective `cfg.name` for `modality`; `info` is the data module's `model_info()`
  (for "multimodal": one `model_info()` per modality, and a section of `cfg` per modality)."""
  if cfg.name == "multimodal":  # `info` is {modality: model_info}
    return build_multimodal_objective(cfg, info or {}, build_objective)
  builders = get(modality).objectives
  if cfg.name not in builders:
    known = sorted({name for m in MODALITIES.values() for name in m.objectives})
    detail = (f"{modality} trains with {sorted(builders)}" if cfg.name in known
              else f"known objectives: {known}")
    raise ValueError(f"objective.name={cfg.name!r} is not one of {sorted(builders)} ({detail})")
  return builders[cfg.name](cfg, modality, dict(info if info is not None else {"num_value_bins": 1}))
