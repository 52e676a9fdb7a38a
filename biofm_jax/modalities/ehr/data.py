"""The EHR modality's data module: tokenisation, masking and `EHRData`.

This module owns how one MEDS subject record (see `meds.py`) becomes the
fixed-shape arrays named in `batch.py`:

* `EHRVocab` (in `vocab.py`, re-exported here): code -> token id and per-code quantile
  edges for numeric values, built once from the training split, saved as JSON.
* `TokenizeEHR` and `MaskEHR` (in `tokenize.py`, re-exported here): a record -> the
  example's arrays, and BERT-style masked-modelling targets.
* `EHRData`: what the pipeline and the training loop use (sources, transforms, spec).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import grain
import meds
import numpy as np

from biofm_jax.data import batch, object_state, packing, pipeline
from biofm_jax.data.module import MASKED, NEXT, TIME_TO_EVENT, DataModuleDefaults, check_targets, KeyByModality
from biofm_jax.data.masking import prediction_slots
from biofm_jax.modalities.ehr.vocab import (  # noqa: F401  (re-exported: ehr.EHRVocab, ehr.VOCAB_FILENAME, ...)
    VOCAB_FILENAME, VOCAB_FORMAT, VOCAB_FORMAT_VERSION, EHRVocab)
from biofm_jax.modalities.ehr import synthetic as synthetic
from biofm_jax.modalities.ehr import event_indexing, event_store
from biofm_jax.modalities.ehr import meds as meds_source
from biofm_jax.modalities.ehr import tte_targets
from biofm_jax.modalities.ehr.tokenize import (  # noqa: F401  (re-exported: ehr.TokenizeEHR, ehr.MaskEHR, ...)
    TIME_INPUTS, VALUE_INPUTS, WINDOWS, MaskEHR, TokenizeEHR, input_fields, window_stats)
from biofm_jax.modalities.ehr.windows import (TRAIN_WINDOWS, WindowSource, birth_time, cover_windows, event_coverage,
                                              kept_static, static_room)

BIRTH_CODE = meds.birth_code
EVENT_STORE_DIR = "ehr_events"  # under the run's artifacts, with event_store="auto"
UNK_SAMPLE_SUBJECTS = 2000  # tuning subjects the summary's [UNK] rate is measured on
TARGETS = (MASKED, NEXT, TIME_TO_EVENT)  # what its examples can carry for an objective (data/module.py)

log = logging.getLogger(__name__)


# ================================================================ data module
def packs(cfg: Any) -> bool:
  """Whether `data.ehr` packs several windows per row (runs saved before packing existed did not)."""
  return bool(cfg.get("pack", False))


def training_example_spec(max_len: int, targets: str, pack: bool, tte_events: int = 0,
                          inputs: tuple[str, ...] = ()) -> dict:
  """The fields of a training (and evaluation) example: the optional `inputs`, the `targets`
  (masked tokens or time to event; next-event targets are the tokens themselves), segment
  ids when rows are packed."""
  spec = batch.ehr_example_spec(max_len, with_targets=targets == MASKED, inputs=inputs)
  if targets == TIME_TO_EVENT:
    spec.update(batch.tte_example_spec(max_len, tte_events))
  if pack:
    spec[batch.SEGMENT_IDS] = ((max_len,), np.int32)
  return spec


@object_state.storable
class EHRData(DataModuleDefaults):
  """The EHR modality as the pipeline and training loop see it."""
  name = "ehr"

  def __init__(self, dataset: Any, vocab: EHRVocab, *, max_len: int, window: str,
               mask_rate: float, targets: str, train_windows: str = "one", window_overlap: float = 0.0,
               pack: bool = False, tte: Mapping[str, int] | None = None, inputs: tuple[str, ...] = ()):
    check_targets("EHRData", targets, TARGETS)
    if train_windows not in TRAIN_WINDOWS:
      raise ValueError(f"config.data.ehr.train_windows is {train_windows!r}, expected one of {TRAIN_WINDOWS}")
    self.dataset, self.vocab = dataset, vocab
    self.max_len, self.window, self.mask_rate, self.targets = max_len, window, mask_rate, targets
    self.train_windows, self.window_overlap = train_windows, float(window_overlap)
    self.pack = bool(pack)  # several training windows per row (`data/packing.py`)
    self.inputs = tuple(inputs)  # optional input fields (`input_fields`)
    # time_to_event: {"tasks": K, "points": per row, "events": per row} (`tte_targets.py`)
    self.tte = {**tte_targets.DEFAULTS, **(tte or {})}
    self.tte_codes = tte_targets.task_codes(vocab, self.tte["tasks"]) if targets == TIME_TO_EVENT else []
    self._summary: dict[str, int] | None = None
    self._windows = None
    self._packed: packing.PackedSource | None = None
    self._coverage: float | None = None

  @classmethod
  def from_config(cls, cfg: Any, *, targets: str,
                  artifacts_dir: str | os.PathLike) -> EHRData:
    """Opens the MEDS dataset named by `cfg` (= config.data.ehr) and its vocabulary."""
    artifacts_dir = Path(artifacts_dir)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    root = Path(cfg.path) if cfg.path else _synthetic_cohort(cfg, artifacts_dir)
    # Runs saved before the setting existed: the default, which both readers now apply.
    dataset = open_dataset(root, str(cfg.get("event_store", "") or ""), artifacts_dir,
                           drop_duplicates=bool(cfg.get("drop_duplicates", True)))
    vocab = _load_or_build_vocab(dataset, artifacts_dir / VOCAB_FILENAME,
                                 min_count=cfg.min_code_count,
                                 num_value_bins=cfg.num_value_bins)
    if batch.EHR_VALUE_QUANTILE in input_fields(cfg) and vocab.value_bin_edges and not vocab.value_quantile_points:
      raise ValueError(f"{artifacts_dir / VOCAB_FILENAME}: saved before value quantiles were stored; "
                       "data.ehr.value_inputs='bins+quantile' needs a new run")
    # Runs saved before training windows existed trained on one window per subject.
    module = cls(dataset, vocab, max_len=cfg.max_len, window=cfg.window, mask_rate=cfg.mask_rate,
                 targets=targets, train_windows=cfg.get("train_windows", "one"),
                 window_overlap=cfg.get("window_overlap", 0.0), pack=packs(cfg),
                 tte=tte_targets.settings_from_config(cfg), inputs=input_fields(cfg))
    if module.tte_codes:
      tte_targets.save_or_check_tasks(artifacts_dir / tte_targets.TASKS_FILENAME, module.tte_codes)
    return module

  def source(self, split: str):
    """One record per subject of `split` (evaluation, embeddings, joins)."""
    return self.dataset.source(split)

  def training_source(self, split: str = "train"):
    """What training reads: with `train_windows="cover"` the windows that cover every event
    of `split` (`windows.py`), else one record per subject."""
    if self.train_windows == "one":
      return self.source(split)
    if self._windows is None or self._windows[0] != split:
      records = self.source(split)
      static, events = records.static_counts(), records.event_counts()
      _warn_static_left_out(static, self.max_len, split)
      subjects, starts, lengths = cover_windows(static, events, self.max_len, self.window_overlap)
      self._windows = (split, WindowSource(records, static, subjects, starts, lengths, self.max_len))
    return self._windows[1]

  def make_train_dataset(self, *, global_batch_size: int, seed: int, **layout):
    """The training stream over `training_source()` (the loop's hook, `data/module.py`);
    with `pack`, over rows of several windows (`packed_training_source()`)."""
    if not self.pack:
      return pipeline.make_train_dataset(self.training_source(), self.transforms(train=True),
                                         global_batch_size=global_batch_size, seed=seed, name=self.name, **layout)
    packed = [self._pack_with_targets(), *self._masking(), KeyByModality(self.name)]
    return pipeline.make_train_dataset(self.packed_training_source(), packed,
                                       global_batch_size=global_batch_size, seed=seed, name=self.name, **layout)

  def packed_training_source(self) -> packing.PackedSource:
    """The training windows packed into rows of max_len tokens (the plan is computed once)."""
    if self._packed is None:
      source = self.training_source()
      self._packed = packing.PackedSource(source, self._token_lengths(source), self.max_len)
    return self._packed

  def _token_lengths(self, source) -> np.ndarray:
    """Tokens each item of `source` becomes: CLS plus its rows, at most max_len - 1 of them."""
    if isinstance(source, WindowSource):
      rows = kept_static(source.static_counts[source.subjects], self.max_len) + source.lengths
    else:
      static = source.static_counts()
      rows = kept_static(static, self.max_len) + source.event_counts() - static
    return 1 + np.minimum(rows, self.max_len - 1)

  def transforms(self, train: bool, mask: bool = True) -> list:
    """The same for train and eval: eval masking is made repeatable by its fixed seed.
    `mask=False` leaves out the masking (embedding extraction). With `pack`, examples are
    one-segment rows so they match the packed training batches' spec."""
    del train
    if not mask:  # embeddings: no targets and no segment ids
      return [self._tokenize(), KeyByModality(self.name)]
    segments = [packing.OneSegment()] if self.pack else []
    return [self._with_targets(), *segments, *self._masking(), KeyByModality(self.name)]

  def _tokenize(self) -> TokenizeEHR:
    return self.tokenizer()

  def tokenizer(self, max_len: int | None = None, window: str | None = None) -> TokenizeEHR:
    """This run's tokeniser (its vocabulary and optional inputs), at another length or window if asked."""
    return TokenizeEHR(self.vocab, max_len or self.max_len, window or self.window, self.inputs)

  def _with_targets(self):
    """The tokeniser, with time-to-event targets when those are the targets."""
    if self.targets != TIME_TO_EVENT:
      return self._tokenize()
    return tte_targets.TimeToEventTargets.for_vocab(self._tokenize(), self.vocab, self.tte_codes,
                                                    points=self.tte["points"], events=self.tte["events"])

  def _pack_with_targets(self):
    """A packed row's records -> one row; time-to-event rows share their points
    (`tte_targets.PackTimeToEvent`), so a row never holds more than `tte_points`."""
    targets = self._with_targets()
    if isinstance(targets, tte_targets.TimeToEventTargets):
      return tte_targets.PackTimeToEvent(targets)
    return packing.PackTokenized(targets, self.max_len)

  def _masking(self) -> list:
    return [MaskEHR(self.vocab.size, self.mask_rate)] if self.targets == MASKED else []

  def example_spec(self) -> dict:
    return {self.name: training_example_spec(self.max_len, self.targets, self.pack, self.tte.get("events", 0),
                                             self.inputs)}

  def embedding_spec(self) -> dict:
    return {self.name: batch.ehr_example_spec(self.max_len, with_targets=False, inputs=self.inputs)}

  def model_info(self) -> dict[str, dict[str, int]]:
    info = {"vocab_size": self.vocab.size, "num_value_bins": self.vocab.num_value_bins, "max_len": self.max_len}
    if self.tte_codes:
      info.update(tte_tasks=len(self.tte_codes), tte_points=self.tte["points"])
    if self.targets == MASKED:
      info["prediction_slots"] = prediction_slots(self.max_len, self.mask_rate)
    return {self.name: info}

  def summary(self) -> dict[str, int | float]:
    """Counts for the logs; reads the train and tuning splits once, then cached."""
    if self._summary is None:
      out: dict[str, int | float] = {
          f"subjects_{split}": int(len(ids)) for split, ids in self.dataset.splits.items()}
      out["vocab_size"] = self.vocab.size
      out["vocab_codes"] = len(self.vocab.codes)
      out["codes_below_min_count"] = self.vocab.num_rare_codes
      out.update(_unk_counts(self.vocab, self._split_records("tuning", at_most=UNK_SAMPLE_SUBJECTS)))
      has_train = len(self.dataset.splits.get("train", ()))
      counts = self.source("train").event_counts() if has_train else np.zeros(0, np.int64)  # reads no record
      stats = window_stats(counts, self.max_len)
      out.update({f"train_{k}": v for k, v in stats.items()})
      static = self.source("train").static_counts() if has_train else np.zeros(0, np.int64)
      out["train_static_rows_left_out"] = int((static - kept_static(static, self.max_len)).sum())
      if len(self.dataset.splits.get("train", ())):
        out["train_windows"] = len(self.training_source())
        out["train_event_coverage"] = round(self.train_event_coverage(), 6)
        if self.pack:
          packed = self.packed_training_source()
          out["train_packed_rows"] = len(packed)
          out["train_packed_padding"] = round(packed.padding_fraction(), 6)
      out.update({f"meds_{k}": v for k, v in dict(self.dataset.stats).items()})
      self._summary = out
    return dict(self._summary)

  def train_metrics(self) -> dict[str, float]:
    """The loop's first metrics row: how much of the training split an epoch's windows hold."""
    return {"data/train_event_coverage": self.train_event_coverage()}

  def train_event_coverage(self) -> float:
    """The share of the training split's timed events that an epoch's training windows hold
    (computed once: the summary and the loop's metrics both ask)."""
    if self._coverage is None:
      self._coverage = self._count_train_event_coverage()
    return self._coverage

  def _count_train_event_coverage(self) -> float:
    source = self.training_source()
    if isinstance(source, WindowSource):
      return event_coverage(source.records.event_counts(), source.static_counts, source.starts, source.lengths,
                            source.subjects)
    static, events = source.static_counts(), source.event_counts()
    _warn_static_left_out(static, self.max_len, "train")
    room = self.max_len - 1 - kept_static(static, self.max_len)
    timed = events - static
    starts = np.maximum(timed - room, 0) if self.window == "recent" else np.zeros_like(timed)
    return event_coverage(events, static, starts, np.minimum(room, timed), np.arange(len(events)))

  def _split_records(self, split: str, at_most: int | None = None) -> Iterable[Mapping[str, Any]]:
    """The split's records, or `at_most` of them evenly spaced (start-up must not read a
    whole split of a dataset larger than memory)."""
    if split not in self.dataset.splits or not len(self.dataset.splits[split]):
      return ()
    source = self.source(split)
    positions = np.arange(len(source))
    if at_most is not None and len(positions) > at_most:
      positions = np.unique(np.linspace(0, len(source) - 1, at_most).astype(np.int64))
    return (source[int(i)] for i in positions)


def _warn_static_left_out(static: np.ndarray, max_len: int, split: str) -> None:
  """Static rows beyond half a window are in no example: say how many, of how many subjects."""
  left_out = np.asarray(static, np.int64) - kept_static(static, max_len)
  if left_out.any():
    log.warning("EHR %s split: %d subjects have more static (null-time) rows than half a window (%d of max_len %d); "
                "their %d static rows beyond that are left out of every window so timed events keep room",
                split, int((left_out > 0).sum()), static_room(max_len), max_len, int(left_out.sum()))


def _unk_counts(vocab: EHRVocab, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
  events = unk = 0
  for record in records:
    ids = vocab.code_ids(np.asarray(record["codes"], dtype=object))
    events += len(ids)
    unk += int((ids == batch.UNK_ID).sum())
  return {"tuning_events": events, "tuning_unk_events": unk,
          "tuning_unk_rate": unk / events if events else 0.0}


def open_dataset(root: Path, store: str, artifacts_dir: Path, *, drop_duplicates: bool = True):
  """The MEDS data at `root`: in memory (`store` ""), or out of core from an event store
  (`event_store.py`) at the path `store` names, or built once under the run's artifacts
  ("auto"; one process: a multi-host run reads a store built by experiments/index_meds.py).
  Both drop duplicate rows by the same rule, or both keep them (`duplicates.py`)."""
  if not store:
    return meds_source.MEDSDataset(root, drop_duplicates=drop_duplicates)
  path = artifacts_dir / EVENT_STORE_DIR if store == "auto" else Path(store)
  if store == "auto" and not (path / event_store.SOURCE_FILE).exists():
    log.info("EHR: indexing %s into the event store %s", root, path)
    event_indexing.build_event_store(root, path, drop_duplicates=drop_duplicates)
  dataset = event_store.EventStore(path)
  if dataset.root.resolve() != root.resolve():
    raise ValueError(f"config.data.ehr.event_store={store!r}: the store at {path} indexes {dataset.root}, "
                     f"but config.data.ehr.path is {root}")
  if dataset.drop_duplicates != drop_duplicates:
    raise ValueError(f"config.data.ehr.drop_duplicates is {drop_duplicates}, but the event store at {path} was "
                     f"built with drop_duplicates={dataset.drop_duplicates}; match it or build another store")
  return dataset


def _synthetic_cohort(cfg: Any, artifacts_dir: Path) -> Path:
  """The synthetic cohort under artifacts_dir, written once (reused on resume)."""

  root = artifacts_dir / "synthetic_meds"
  # write_synthetic_meds renames a finished cohort into place: if it is there, it is whole.
  if not (root / meds.dataset_metadata_filepath).exists():
    log.info("EHR: writing a synthetic MEDS cohort of %d subjects", cfg.synthetic_subjects)
    synthetic.write_synthetic_meds(root, num_subjects=cfg.synthetic_subjects,
                                   seed=cfg.synthetic_seed)
  return root


def _load_or_build_vocab(dataset: Any, path: Path, *, min_count: int,
                         num_value_bins: int) -> EHRVocab:
  """A resumed run must reuse the exact vocabulary it was trained with."""
  if path.exists():
    vocab = EHRVocab.load(path)
    if (vocab.min_count, vocab.num_value_bins) != (min_count, num_value_bins):
      raise ValueError(
          f"EHR vocabulary {path}: built with min_count={vocab.min_count}, "
          f"num_value_bins={vocab.num_value_bins}, but the config asks for "
          f"min_code_count={min_count}, num_value_bins={num_value_bins}; use a new "
          f"workdir or match the config")
    log.info("EHR: loaded vocabulary of %d codes", len(vocab.codes))
    return vocab
  if isinstance(dataset, event_store.EventStore):  # counted and sampled when the store was built
    vocab = EHRVocab.from_counts(dataset.training_code_counts, dataset.training_values(), min_count=min_count,
                                 num_value_bins=num_value_bins)
  else:
    source = dataset.source("train")
    vocab = EHRVocab.build((source[i] for i in range(len(source))), min_count=min_count,
                           num_value_bins=num_value_bins)
  vocab.save(path)
  log.info("EHR: built vocabulary of %d codes (%d below min_count)", len(vocab.codes),
           vocab.num_rare_codes)
  return vocab
