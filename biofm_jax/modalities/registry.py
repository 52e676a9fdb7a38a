"""The one table of modalities: what each registered modality brings, by name.

Shared code (the training loop, preparation, the model builder, the objective lookup,
ahead-of-time sizing, record-label evaluation) reads this table and knows no modality by
name. A row (`Modality`) names:

  data        from_config(cfg, *, targets, artifacts_dir) -> the data module, making the
              targets the objective names (`ObjectiveKind.targets`)
  model       (config, model_info) -> the modality's model description (encoder and heads)
  objectives  {objective name: its class}: the pre-training objectives this modality trains
              with; the class says whether it is causal and builds itself from
              (objective cfg, modality name, model_info) (`ObjectiveKind`)
  sizing      (data cfg, targets, vocab_size) -> a data module that reads nothing
              (`data.module.ShapesOnly`, or the modality's own where it can open without
              data): its specs, model info and any device transform from the config
              alone, for `train/aot.py`; None when the data decides the shapes (gene
              panels, table columns)
  baseline    the classical model on raw features that record-label reports put beside
              the probe (`eval/record_tasks.py`); None where labels come from elsewhere
  reference_losses  (data module, config, train_split=, eval_split=) -> {name: loss} that
              a pre-trained model must beat, logged by the loop; None for none
  artifacts   the files its data module writes to a run's artifacts/ that a trained model
              needs (vocabularies, statistics): the only ones an export carries, and the
              ones fine-tuning copies from the pre-trained run
  labeled     (config, artifacts_dir, targets) -> fine-tuning's labelled data (EHR: MEDS
              label rows, `ehr/task_data.py`); None: the label columns the records carry
              (`data/record_task.py`), which every record modality shares

Adding a modality: a folder `modalities/<name>/` with those pieces, and one row below.
Adding an objective: its class (`from_config`, `causal`, `targets`), and its name in a row.
Each field is typed (`Modality`, the protocols it names); `make typecheck` checks the rows.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Callable, Mapping, Protocol, Sequence

import ml_collections

from biofm_jax.data import batch as B
from biofm_jax.data.artifacts import copy_regular_files
from biofm_jax.data.labels import read_labels
from biofm_jax.data.masking import prediction_slots
from biofm_jax.data.module import MASKED, TIME_TO_EVENT, DataModule, ShapesOnly, SizedData
from biofm_jax.data.multimodal import MultimodalData
from biofm_jax.data.prepared import open_prepared
from biofm_jax.data.record_task import OUTCOME_COLUMN_TYPES, RecordTaskData
from biofm_jax.modalities import synthetic_cohort
from biofm_jax.modalities.ecg import baseline as ecg_baseline
from biofm_jax.modalities.ecg import data as ecg_data
from biofm_jax.modalities.ecg import model as ecg_model
from biofm_jax.modalities.ecg.mae import ECGReconstruction
from biofm_jax.modalities.ehr import baseline as ehr_baseline
from biofm_jax.modalities.ehr import data as ehr_data
from biofm_jax.modalities.ehr import model as ehr_model
from biofm_jax.modalities.ehr import task_data as ehr_task_data
from biofm_jax.modalities.ehr import tokenize as ehr_tokenize
from biofm_jax.modalities.ehr import tte_targets
from biofm_jax.modalities.ehr import unigram as ehr_unigram
from biofm_jax.modalities.ehr import vocab as ehr_vocab
from biofm_jax.modalities.imaging import baseline as imaging_baseline
from biofm_jax.modalities.imaging import data as imaging_data
from biofm_jax.modalities.imaging import model as imaging_model
from biofm_jax.modalities.imaging.mae import MaskedAutoencoding
from biofm_jax.modalities.omics import baseline as omics_baseline
from biofm_jax.modalities.omics import data as omics_data
from biofm_jax.modalities.omics import gene_vocab
from biofm_jax.modalities.sequence import baseline as sequence_baseline
from biofm_jax.modalities.sequence import data as sequence_data
from biofm_jax.modalities.tabular import baseline as tabular_baseline
from biofm_jax.modalities.tabular import data as tabular_data
from biofm_jax.modalities.tabular import model as tabular_model
from biofm_jax.modalities.tabular.masked_features import MaskedFeatureModelling
from biofm_jax.models import model as model_lib
from biofm_jax.models.description import ModelDescription, TokenModality
from biofm_jax.objectives import Objective
from biofm_jax.objectives.autoregressive import NextEventModelling
from biofm_jax.objectives.contrastive import pairs_of_configured_modalities
from biofm_jax.objectives.masked import MaskedCodeModelling
from biofm_jax.objectives.ordinal_values import OrdinalValueModelling
from biofm_jax.objectives.motor import TimeToEventModelling
from biofm_jax.objectives.multimodal import build_multimodal_objective

log = logging.getLogger(__name__)


class ObjectiveKind(Protocol):
  """An objective's class, as a row names it: a fact known before any data is read, and
  how it builds itself once the data's model info is known."""

  @property
  def causal(self) -> bool:
    """The model's stack must be causal (its targets lie after their position)."""
    ...

  @property
  def targets(self) -> str:
    """What the data must add to each example for it (`data/module.py`: MASKED, NEXT, ...)."""
    ...

  def from_config(self, cfg: Any, modality: str, info: Mapping[str, Any]) -> Objective:
    ...


class OpenData(Protocol):
  def __call__(self, cfg: Any, *, targets: str, artifacts_dir: str | os.PathLike[str]) -> DataModule:
    ...


class ModelDescriptionOf(Protocol):
  def __call__(self, config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> ModelDescription:
    ...


class OpenLabeled(Protocol):
  def __call__(self, config: ml_collections.ConfigDict, artifacts_dir: pathlib.Path, targets: str) -> DataModule:
    ...


Sizing = Callable[[Any, str, int], SizedData]  # (data cfg, targets, vocab_size) -> shapes only
ReferenceLosses = Callable[..., dict[str, float]]  # (data module, config, train_split=, eval_split=)


@dataclasses.dataclass(frozen=True)
class RawBaseline:
  """A classical model on a modality's raw features, for record-label reports (and its features, per
  subject, in the fused model's HAIM baseline: `eval/raw_baselines.py`)."""
  name: str  # the report's name for it
  model: str  # `eval/classical.fit_predict`'s model name
  description: str
  features: Callable[[Any, Any], Any]  # (train source, source) -> [rows, features]


@dataclasses.dataclass(frozen=True)
class Modality:
  name: str
  data: OpenData
  model: ModelDescriptionOf
  objectives: Mapping[str, ObjectiveKind]
  sizing: Sizing | None = None
  baseline: RawBaseline | None = None
  reference_losses: ReferenceLosses | None = None
  artifacts: tuple[str, ...] = ()
  labeled: OpenLabeled | None = None  # fine-tuning's labelled data; None: the label columns records carry


# ---------------------------------------------------------------- shared pieces of rows
def _token_model(name: str) -> ModelDescriptionOf:
  def build(config: ml_collections.ConfigDict, info: Mapping[str, Any]) -> TokenModality:
    del config
    return TokenModality(name, vocab_size=info["vocab_size"], num_value_bins=info["num_value_bins"],
                         max_len=info["max_len"], prediction_slots=int(info.get("prediction_slots", 0)))
  return build


def _ehr_sizing(cfg: Any, targets: str, vocab_size: int) -> ShapesOnly:
  tte = tte_targets.settings_from_config(cfg)
  inputs = ehr_tokenize.input_fields(cfg)
  spec = ehr_data.training_example_spec(cfg.max_len, targets, ehr_data.packs(cfg), tte["events"], inputs)
  info = {"vocab_size": vocab_size, "num_value_bins": cfg.num_value_bins, "max_len": cfg.max_len}
  if targets == MASKED:
    info["prediction_slots"] = prediction_slots(cfg.max_len, cfg.mask_rate)
  if targets == TIME_TO_EVENT:
    info.update(tte_tasks=min(tte["tasks"], vocab_size - B.NUM_SPECIAL), tte_points=tte["points"])
  return ShapesOnly("ehr", spec, B.ehr_example_spec(cfg.max_len, with_targets=False, inputs=inputs), info)


def _sequence_sizing(cfg: Any, targets: str, vocab_size: int) -> ShapesOnly:
  del targets, vocab_size  # masked tokens only; the tokenizer fixes the vocabulary
  return ShapesOnly("sequence", B.token_sequence_spec(cfg.max_len, with_values=False, with_targets=True),
                    B.token_sequence_spec(cfg.max_len, with_values=False, with_targets=False),
                    {"vocab_size": sequence_data.tokenizer_from_config(cfg).vocab_size, "num_value_bins": 0,
                     "max_len": cfg.max_len, "prediction_slots": prediction_slots(cfg.max_len, cfg.mask_rate)})


def _imaging_sizing(cfg: Any, targets: str, vocab_size: int) -> imaging_data.ImagingData:
  del vocab_size
  return imaging_data.ImagingData(None, imaging_data.ImagingSettings.from_config(cfg), targets=targets)


# ---------------------------------------------------------------- the table
MODALITIES: dict[str, Modality] = {m.name: m for m in (
    Modality("ehr", ehr_data.EHRData.from_config, ehr_model.model_modality,
             {"masked": MaskedCodeModelling, "autoregressive": NextEventModelling,
              "time_to_event": TimeToEventModelling},
             sizing=_ehr_sizing,
             reference_losses=ehr_unigram.reference_losses,
             artifacts=(ehr_vocab.VOCAB_FILENAME, tte_targets.TASKS_FILENAME),
             labeled=ehr_task_data.open_labeled_ehr,
             baseline=RawBaseline("count_lr", "logistic", "count-of-codes features, L2 logistic regression (EHRSHOT)",
                                  ehr_baseline.code_count_features)),
    Modality("imaging", imaging_data.ImagingData.from_config, imaging_model.model_modality,
             {"mae": MaskedAutoencoding},
             sizing=_imaging_sizing,
             baseline=RawBaseline("logistic_intensity_features", "logistic",
                                  "logistic regression on first-order intensity and gradient statistics and the "
                                  "image averaged to 8 pixels per axis", imaging_baseline.intensity_features)),
    Modality("omics", omics_data.OmicsData.from_config, _token_model("omics"),
             {"masked": MaskedCodeModelling, "masked_ordinal": OrdinalValueModelling},
             baseline=RawBaseline("l1_logistic_expression", "l1_logistic",
                                  "L1 logistic regression on normalised counts (log1p)",
                                  omics_baseline.expression_features),
             artifacts=(gene_vocab.VOCAB_FILENAME,)),
    Modality("sequence", sequence_data.SequenceData.from_config, _token_model("sequence"),
             {"masked": MaskedCodeModelling},
             sizing=_sequence_sizing, artifacts=(sequence_data.TOKENIZER_FILENAME,),
             baseline=RawBaseline("logistic_kmer_frequencies", "logistic",
                                  "logistic regression on k-mer frequencies (DNA 4-mers, protein dipeptides) and "
                                  "log length", sequence_baseline.kmer_features)),
    Modality("tabular", tabular_data.TabularData.from_config, tabular_model.model_modality,
             {"masked_features": MaskedFeatureModelling},
             baseline=RawBaseline("logistic_raw_features", "logistic",
                                  "logistic regression on the raw features (mean-imputed, missing indicators, "
                                  "one-hot)", tabular_baseline.table_features),
             artifacts=(tabular_data.STATS_FILENAME,)),
    Modality("ecg", ecg_data.ECGData.from_config, ecg_model.model_modality,
             {"mae": ECGReconstruction},
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


def open_data_module(name: str, cfg: Any, *, objective: str, artifacts_dir: str | os.PathLike[str]) -> DataModule:
  """Modality `name`'s data module (`cfg` = config.data.<name>) making what `objective` (a
  name its row lists: the one check of it, before any data is read) needs."""
  targets = objective_kind(objective, name).targets
  return get(name).data(cfg, targets=targets, artifacts_dir=artifacts_dir)


def open_pretraining_data(config: ml_collections.ConfigDict, artifacts_dir: pathlib.Path, *,
                          writes_artifacts: bool = True) -> DataModule:
  """Pre-training's data module: the one configured modality (from its raw source or a
  prepared dataset), or the multimodal join when `config.data` has a `multimodal` section.
  `writes_artifacts=False` (every process but the first) leaves a prepared folder's
  artifacts to the one writer."""
  if "task" in config:
    raise ValueError("this is a fine-tuning config (it has a task section): run it with "
                     "biofm_jax.train.finetune.finetune / experiments/finetune.py")
  prepared = config.data.get("prepared", "")
  if prepared and "multimodal" in config.data:
    raise ValueError(f"config.data.prepared={prepared!r}: prepared datasets serve single-modality "
                     f"pre-training; fine-tuning and multimodal runs read their raw sources")
  if "multimodal" in config.data:
    return open_multimodal_data(config.data, objectives=config.objective, artifacts_dir=artifacts_dir,
                                seed=config.seed)
  modalities = configured(config.data)
  if len(modalities) != 1:
    raise ValueError(f"config.data must configure exactly one of {sorted(MODALITIES)} (or have "
                     f"a 'multimodal' section); found {modalities}")
  if prepared:  # records tokenised once by experiments/prepare.py (data/prepared.py)
    return open_prepared(prepared, modality=modalities[0], data_config=config.data[modalities[0]].to_dict(),
                         objective=config.objective.name, artifacts_dir=artifacts_dir if writes_artifacts else None)
  return open_data_module(modalities[0], config.data[modalities[0]], objective=config.objective.name,
                          artifacts_dir=artifacts_dir)


def open_task_data(config: ml_collections.ConfigDict, artifacts_dir: pathlib.Path) -> DataModule:
  """Fine-tuning's labelled data over a pre-trained run's data (`config` is a
  `train.finetune.finetune_config`), each record read through the data modules the
  pre-trained run used, with its artifacts (vocabulary, statistics) copied from that run
  by name:
    one modality   its row's `labeled` entry (EHR: MEDS label rows), or the label column
                   `task.label_column` its records carry;
    a join         a labels table keyed by subject (`task.labels`): each subject brings
                   whichever modalities it has (the fused model's downstream use)."""
  artifacts_dir.mkdir(parents=True, exist_ok=True)
  pretrained = pathlib.Path(config.finetune.pretrained) / "artifacts"
  modalities = configured(config.data)
  if "multimodal" in config.data:
    # Checked against the run's artifacts folder itself, so a linked `<modality>/` folder is refused too.
    _copy_artifacts(pretrained, artifacts_dir, [f"{m}/{name}" for m in modalities for name in get(m).artifacts],
                    config.finetune.pretrained)
    if not config.task.get("labels"):
      raise ValueError("config.task.labels is empty: a fused model is fine-tuned on a labels table keyed by "
                       "subject_id (meds.LabelSchema value columns, one row per subject)")
    joined = open_multimodal_data(config.data, objectives=config.objective, artifacts_dir=artifacts_dir,
                                  seed=config.seed)
    return RecordTaskData.from_subject_labels(joined, read_labels(config.task.labels, config.task),
                                              num_time_bins=config.task.num_time_bins,
                                              cut=config.task.get("prediction_time_cut", "inclusive"))
  if len(modalities) != 1:
    raise ValueError(f"config.data must configure one of {sorted(MODALITIES)} or a 'multimodal' join; the "
                     f"pretrained run configures {sorted(config.data.keys())}")
  row = get(modalities[0])
  targets = objective_kind(config.objective.name, row.name).targets  # read as in pre-training
  if row.labeled is not None:
    return row.labeled(config, artifacts_dir, targets)
  columns = record_label_columns(config.task, row.name)
  _copy_artifacts(pretrained, artifacts_dir, row.artifacts, config.finetune.pretrained)
  data = row.data(config.data[row.name], targets=targets, artifacts_dir=artifacts_dir)
  if config.task.type in OUTCOME_COLUMN_TYPES:
    return RecordTaskData.from_outcome_columns(data, config.task.type, columns)
  return RecordTaskData.from_label_column(data, columns[0], config.task.type)


def record_label_columns(task: Any, modality: str) -> tuple[str, ...]:
  """The columns of the records a record task reads: `task.label_column`; for multilabel
  `task.label_columns`; for survival `task.time_column` and `task.event_column`."""
  where = f"{modality} records are fine-tuned on label columns they carry (config.data.{modality}.label_columns)"
  if task.type == "multilabel":
    columns = tuple(task.get("label_columns") or ())
    if not columns:
      raise ValueError(f"config.task.label_columns is empty: {where}; a multilabel task names its flag columns")
    return columns
  if task.type == "survival":
    columns = (task.get("time_column") or "", task.get("event_column") or "")
    if not all(columns):
      raise ValueError(f"config.task.time_column and event_column must both be set: {where}; a survival task names "
                       f"the days to the event or censoring and the event flag")
    return columns
  if not task.get("label_column"):
    raise ValueError(f"config.task.label_column is empty: {where}")
  return (task.label_column,)


def _copy_artifacts(source: pathlib.Path, destination: pathlib.Path, names: Sequence[str], run: str) -> None:
  """The pre-trained run's artifacts of `names` that it has, as regular files by name (a link
  is named, and refused, even when it leads nowhere)."""
  destination.mkdir(parents=True, exist_ok=True)
  wanted = [name for name in names
            if ((source / name).exists() or (source / name).is_symlink()) and not (destination / name).exists()]
  if wanted:
    copy_regular_files(source, destination, wanted, f"pretrained run {run}")


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


def open_multimodal_data(data_cfg: Any, *, objectives: Any, artifacts_dir: str | os.PathLike[str],
                         seed: int = 0) -> MultimodalData:
  """The multimodal join (`data/multimodal.py`) of the modalities `data_cfg.multimodal` names."""
  return MultimodalData.from_config(data_cfg, objectives=objectives, artifacts_dir=artifacts_dir, seed=seed,
                                    open_modality=open_data_module, registered=tuple(MODALITIES),
                                    check_objectives=check_contrastive,
                                    synthetic_paths=synthetic_cohort.run_cohort_paths)


def model_artifact_files(artifacts_dir: str | os.PathLike[str]) -> list[str]:
  """The files under a run's `artifacts_dir` that its model needs: each row's `artifacts`, at
  the top (a one-modality run) or under `<modality>/` (a multimodal join), where present.
  An export copies these and nothing else."""
  root = pathlib.Path(artifacts_dir)
  found = []
  for row in MODALITIES.values():
    for name in row.artifacts:
      found += [path for path in (name, f"{row.name}/{name}") if (root / path).is_file() or (root / path).is_symlink()]
  return found


def reference_losses(data_module: DataModule, config: ml_collections.ConfigDict, *, train_split: str,
                     eval_split: str) -> dict[str, float]:
  """The losses `data_module`'s modality says a model must beat (`{}` for none, and for
  joined modalities)."""
  row = MODALITIES.get(data_module.name)
  if row is None or row.reference_losses is None:
    return {}
  return row.reference_losses(data_module, config, train_split=train_split, eval_split=eval_split)


def model_modalities(config: ml_collections.ConfigDict,
                     data_info: Mapping[str, Mapping[str, Any]]) -> dict[str, ModelDescription]:
  """{modality: its model description} from each data module's `model_info()`."""
  return {name: get(name).model(config, info) for name, info in data_info.items()}


def objective_kind(name: str, modality: str) -> ObjectiveKind:
  """The class a row names for objective `name`; a one-line error naming what it trains with."""
  kinds = get(modality).objectives
  if name not in kinds:
    known = sorted({n for m in MODALITIES.values() for n in m.objectives})
    detail = f"{modality} trains with {sorted(kinds)}" if name in known else f"known objectives: {known}"
    raise ValueError(f"objective.name={name!r} is not one of {sorted(kinds)} ({detail})")
  return kinds[name]


def is_causal(objective_cfg: Any, modalities: Sequence[str]) -> bool:
  """Whether `objective_cfg` needs a causal stack over `modalities` (a multimodal objective
  never does: its towers and fusion are bidirectional, and it refuses causal members)."""
  if objective_cfg.name == "multimodal" or len(modalities) != 1:
    return False
  return bool(objective_kind(objective_cfg.name, modalities[0]).causal)


def build_model(config: ml_collections.ConfigDict, data_info: Mapping[str, Mapping[str, Any]]) -> Any:
  """The pre-training model for `data_info` (`{modality: model_info}`, e.g.
  `{"ehr": {"vocab_size": ..., ...}}`): `models/model.py` over the registered descriptions."""
  if not data_info:
    raise ValueError(f"no model for modalities []; registered: {sorted(MODALITIES)}")
  unknown = sorted(set(data_info) - set(MODALITIES))
  if unknown:
    raise ValueError(f"no model for modalities {sorted(data_info)}; registered: {sorted(MODALITIES)}")
  return model_lib.build_model(config, model_modalities(config, data_info),
                               causal=is_causal(config.objective, list(data_info)))


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
  kind = objective_kind(cfg.name, modality)
  return kind.from_config(cfg, modality, dict(info if info is not None else {"num_value_bins": 1}))
