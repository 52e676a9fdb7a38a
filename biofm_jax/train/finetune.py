"""Fine-tuning from a pre-training run: config, labelled data, task model, partial restore.

`finetune(config, workdir)` is fine-tuning's entry: it hands the one training loop
(`loop.train_and_evaluate`) its labelled data (`open_labeled_data`), its setup (the
`TaskModel` over the pre-trained backbone and the supervised objective,
`build_finetune_training`) and its first state (the backbone restored from the
pre-training checkpoint, `initial_state`). The config comes from `finetune_config`, from
two parts:
  * the pre-training run's own config, read from its checkpoint: model, data and objective
    sections, so the backbone and the tokenisation are exactly the pre-trained ones;
  * the fine-tuning config file (`configs/finetune.py`): task, finetune, train, checkpoint.
The backbone is a partial restore of the checkpoint's parameters into the new tree
(`load_pretrained`), with every architecture difference named if they do not fit.
"""
from __future__ import annotations

import logging
import math
import pathlib

import jax
import ml_collections
import numpy as np
from sklearn.linear_model import LogisticRegression

from biofm_jax.config import config_to_dict
from biofm_jax.data import batch as B
from biofm_jax.data.labels import few_shot_indices, labels_name
from biofm_jax.modalities.registry import build_model, open_task_data
from biofm_jax.models.task import BACKBONE_LABEL, INPUT_MEAN, INPUT_SCALE, POOLINGS, LoRAModel, TaskModel, trainable
from biofm_jax.objectives.supervised import SupervisedObjective
from biofm_jax.train.checkpoint import pretrained_checkpoint, restore_run_params
from biofm_jax.train.build import TrainingSetup, build_training
from biofm_jax.train.loop import open_once, train_and_evaluate
from biofm_jax.train.embed import embed_split
from biofm_jax.train.state import param_count

log = logging.getLogger("biofm_jax")
# Sections of the pre-training config that define the backbone and its inputs.
PRETRAINED_SECTIONS = ("model", "objective")
DATA_FIELDS_FROM_FINETUNE = ("batch_size", "num_workers")
STATISTICS_ROWS = 2048  # training rows the head's input statistics are measured on, at most
# How the task head starts: at zero (every task at its prior), or at a logistic probe fitted
# on the training rows' pre-trained embeddings (LP-FT; classification tasks: regression and
# survival heads start at zero either way).
HEAD_INITS = ("zeros", "probe")
PROBE_TASKS = ("binary", "multiclass", "multilabel")


def saved_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The (locked) config saved in a run's latest checkpoint."""
  _, _, saved = pretrained_checkpoint(workdir)
  config = ml_collections.ConfigDict(saved)
  config.lock()
  return config


def finetune_config(finetune: ml_collections.ConfigDict, pretrained_workdir: str | pathlib.Path,
                    ) -> ml_collections.ConfigDict:
  """The fine-tuning run's config: `finetune`'s sections over the pre-training run's model,
  data and objective. `finetune.finetune.pretrained` is set to the pre-training workdir."""
  _, _, saved = pretrained_checkpoint(pretrained_workdir)
  config = ml_collections.ConfigDict(config_to_dict(finetune))
  for section in PRETRAINED_SECTIONS:
    config[section] = ml_collections.ConfigDict(saved[section])
  data = dict(saved["data"])
  data.update({k: finetune.data[k] for k in DATA_FIELDS_FROM_FINETUNE if k in finetune.data})
  withhold = tuple(finetune.finetune.get("withhold", ()))
  if withhold:
    if "multimodal" not in data:
      raise ValueError(f"finetune.withhold is {list(withhold)}, but {pretrained_workdir} pre-trained one modality "
                       "(its config has no data.multimodal): withholding is for fused models")
    data["multimodal"] = {**data["multimodal"], "withhold": withhold}
  config.data = ml_collections.ConfigDict(data)
  config.finetune.pretrained = str(pathlib.Path(pretrained_workdir).absolute())
  if not config.task.name:  # reports are titled by the task: the labels' own name unless one is given
    config.task.name = (labels_name(config.task.labels) if config.task.labels
                        else config.task.synthetic or config.task.get("label_column", ""))
  check_architecture(finetune, saved)
  config.lock()
  return config


def check_architecture(finetune: ml_collections.ConfigDict, saved: dict) -> None:
  """A fine-tuning config may pin model fields (`--config.model.num_layers=12`; None = take
  the checkpoint's); any that differ from the checkpoint's are an error naming them."""
  wanted = {k: v for k, v in (config_to_dict(finetune).get("model") or {}).items() if v is not None}
  have = saved.get("model") or {}
  differ = sorted(k for k in wanted if k in have and wanted[k] != have[k])
  if differ:
    raise ValueError("the pretrained checkpoint's architecture does not match the config: " + ", ".join(
        f"model.{k}: checkpoint {have[k]!r}, config {wanted[k]!r}" for k in differ))


def open_labeled_data(config: ml_collections.ConfigDict, artifacts_dir: pathlib.Path):
  """The labelled data of `config.task` over the pre-trained run's data, opened by the
  pre-trained modality's registry row (MEDS label rows for EHR; the label columns records
  carry for the others); few-shot training rows when `finetune.train_labels_per_class` asks."""
  data = open_task_data(config, pathlib.Path(artifacts_dir))
  if config.finetune.train_labels_per_class:
    rows = few_label_rows(data.split_labels("train"), config.finetune.train_labels_per_class,
                          config.finetune.label_seed)
    data = data.with_train_rows(rows)
  return data


def few_label_rows(labels, k: int, seed: int) -> np.ndarray:
  """Few-shot training rows: k per class for binary and multiclass labels (as the few-shot
  sweep of the reports draws them), k rows for other tasks; fixed by the seed."""
  if labels.task_type in ("binary", "multiclass"):
    return few_shot_indices(labels.targets[B.TASK_LABEL].astype(np.int64), k, seed)
  return np.sort(np.random.default_rng([seed, k]).choice(len(labels), min(k, len(labels)), replace=False))


def build_task_model(config: ml_collections.ConfigDict, backbone, info, embedding_output: tuple[str, ...]):
  """The task model: `embedding_output` is where the backbone's outputs hold the data's embedding
  (`("ehr", "embedding")`, `("fused", "embedding")`, ...), unless `task.embedding` names another."""
  mode = config.finetune.mode
  embedding = tuple(config.task.embedding.split("/")) if config.task.embedding else tuple(embedding_output)
  # LoRA's backbone is frozen by the optimiser's labels, not by cutting its gradient: the
  # adapters inside it must still receive one.
  pooling = config.task.get("pooling", "summary")  # runs saved before the setting: the summary
  if pooling not in POOLINGS:
    raise ValueError(f"task.pooling is {pooling!r}, expected one of {POOLINGS}")
  model = TaskModel(backbone, embedding, info.num_outputs, frozen_backbone=mode == "frozen",
                    dropout_rate=config.finetune.head_dropout, proportional_hazards=info.type == "survival",
                    prior_logits=info.prior_logits, pooling=pooling)
  if mode == "lora":
    return LoRAModel(model, rank=config.finetune.lora_rank, alpha=config.finetune.lora_alpha)
  return model


def build_task_objective(info):
  return SupervisedObjective(info.type, info.num_outputs, info.time_bin_edges)


def load_pretrained(state, setup, pretrained_workdir: str | pathlib.Path):
  """`state` with its backbone parameters replaced by the pre-training checkpoint's,
  restored directly into the backbone's shardings. Shapes must match: every differing
  parameter is named."""
  step, backbone = restore_run_params(pretrained_workdir, setup.abstract_state.params["backbone"])
  params = dict(state.params)
  params["backbone"] = backbone
  log.info("fine-tuning from %s (step %d): %d backbone parameters restored", pretrained_workdir, step,
           param_count(params["backbone"]))
  return state.replace(params=params)


def build_finetune_training(config: ml_collections.ConfigDict, data, devices=None) -> TrainingSetup:
  """The training setup of a fine-tuning run: the pre-training model for the data as the
  backbone of a task model, the task's supervised objective, and the optimiser's labels
  for the adaptation mode (full, frozen, LoRA)."""
  backbone = build_model(config, data.model_info())
  model = build_task_model(config, backbone, data.info, data.embedding_output)
  scale = backbone_lr_scale(config)
  labels = trainable(config.finetune.mode, BACKBONE_LABEL if scale != 1.0 else "train")
  return build_training(config, data, devices, model=model, objective=build_task_objective(data.info),
                        trainable=labels, lr_scales={BACKBONE_LABEL: scale} if scale != 1.0 else None)


def backbone_lr_scale(config: ml_collections.ConfigDict) -> float:
  """The backbone's learning rate as a multiple of the head's: full fine-tuning's setting
  (the other modes do not train the backbone's own weights: 1, as for runs saved before
  the setting existed)."""
  scale = float(config.finetune.get("backbone_lr_scale", 1.0))
  if not scale > 0:
    raise ValueError(f"finetune.backbone_lr_scale is {scale}; expected a multiple > 0 of the head's learning rate")
  return scale if config.finetune.mode == "full" else 1.0


def initial_state(config: ml_collections.ConfigDict, setup: TrainingSetup, data=None):
  """A fresh fine-tuning state: the pre-trained backbone (or all random with init=scratch),
  and with the labelled `data` the head's input statistics measured on its training rows."""
  state = setup.init_state(config.seed)
  if config.finetune.init == "pretrained":
    state = load_pretrained(state, setup, config.finetune.pretrained)
  if data is None:
    return state
  head_init = config.finetune.get("head_init", "zeros")  # runs saved before the setting: zeros
  if head_init not in HEAD_INITS:
    raise ValueError(f"finetune.head_init is {head_init!r}, expected one of {HEAD_INITS}")
  state, embeddings, rows = head_input_statistics(state, setup, data, batch_size=config.data.batch_size,
                                                  seed=config.finetune.label_seed)
  if head_init == "probe" and embeddings is not None:
    state = probe_head(state, embeddings, data.split_labels("train"), rows, data.info)
  return state


def head_input_statistics(state, setup: TrainingSetup, data, *, batch_size: int, seed: int = 0):
  """(`state` with the head's `input_mean` / `input_scale` set to the mean and 1 / standard
  deviation of each embedding feature over (up to `STATISTICS_ROWS` of) the training rows,
  as the backbone embeds them now; those embeddings; their training rows). One process
  only: with several, the identity stays (and no embeddings are returned)."""
  if jax.process_count() > 1:
    log.warning("fine-tuning over %d processes: the head's input statistics are left at identity",
                jax.process_count())
    return state, None, None
  rows = np.arange(len(data.split_labels("train")))
  if len(rows) > STATISTICS_ROWS:
    rows = np.sort(np.random.default_rng(seed).choice(len(rows), STATISTICS_ROWS, replace=False))
    data = data.with_train_rows(rows)
  embeddings = embed_split(setup, state.params, data, "train", batch_size=batch_size, output=("task", "embedding"))
  mean = embeddings.mean(axis=0)
  spread = embeddings.std(axis=0)
  # A feature that does not vary is left unscaled rather than blown up.
  scale = np.where(spread > 1e-6 * max(float(spread.max()), 1e-12), 1.0 / np.maximum(spread, 1e-30), 1.0)
  params = dict(state.params)
  for name, value in ((INPUT_MEAN, mean), (INPUT_SCALE, scale)):
    params[name] = jax.device_put(np.asarray(value, np.float32), params[name].sharding)
  log.info("head input statistics from %d training rows: feature spread %.3g to %.3g", len(embeddings),
           float(spread.min()), float(spread.max()))
  return state.replace(params=params), embeddings, rows


def head_inputs(embeddings: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
  """What the task head reads (`TaskModel`): standardised features, then a parameter-free
  LayerNorm over them (flax's epsilon)."""
  x = (np.asarray(embeddings, np.float64) - mean) * scale
  x = x - x.mean(axis=-1, keepdims=True)
  return x / np.sqrt(x.var(axis=-1, keepdims=True) + 1e-6)


def probe_head(state, embeddings: np.ndarray, labels, rows: np.ndarray, info):
  """`state` with the head set to an L2 logistic regression fitted on the head's inputs of
  the training rows (`rows` of `labels`): linear probing, then fine-tuning (LP-FT, Kumar et
  al. 2022), so the backbone's first updates follow a head that already fits rather than a
  zero one whose gradients reshape the features at random."""
  if info.type not in PROBE_TASKS:  # regression and survival heads start at zero, as with "zeros"
    log.info("finetune.head_init='probe' fits %s heads; this %s task's head starts at zero", PROBE_TASKS, info.type)
    return state
  params = dict(state.params)
  x = head_inputs(embeddings, np.asarray(params[INPUT_MEAN]), np.asarray(params[INPUT_SCALE]))
  y = np.asarray(labels.targets[B.TASK_LABEL])[rows]
  columns = [y] if info.type == "binary" else [y[:, j] for j in range(y.shape[1])] if info.type == "multilabel" else None
  if columns is None:  # multiclass: one softmax regression over every class id
    fit = LogisticRegression(max_iter=2000).fit(x, y.astype(np.int64))
    kernel, bias = np.zeros((x.shape[1], info.num_outputs)), np.full(info.num_outputs, -30.0)
    kernel[:, fit.classes_], bias[fit.classes_] = fit.coef_.T, fit.intercept_
  else:
    fits = [LogisticRegression(max_iter=2000).fit(x, c.astype(np.int64)) for c in columns]
    kernel = np.stack([f.coef_[0] for f in fits], axis=1)
    bias = np.asarray([f.intercept_[0] for f in fits])
  head = dict(params["head"])
  head["kernel"] = jax.device_put(np.asarray(kernel, np.float32), head["kernel"].sharding)
  head["bias"] = jax.device_put(np.asarray(bias, np.float32), head["bias"].sharding)
  params["head"] = head
  log.info("head initialised by a logistic probe on %d training rows (LP-FT)", len(x))
  return state.replace(params=params)


def steps_from_labels(config: ml_collections.ConfigDict, train_rows: int) -> ml_collections.ConfigDict:
  """`config` with `train.num_steps` set from the label count where `finetune.epochs` asks
  (epochs x training rows / batch, rounded up; the warm-up at most a tenth of them), so a
  few hundred labels are not trained on for as many steps as a hundred thousand."""
  epochs = float(config.finetune.get("epochs", 0.0) or 0.0)  # runs saved before the setting: 0
  if epochs < 0:
    raise ValueError(f"config.finetune.epochs is {epochs}; expected 0 (use train.num_steps) or more")
  if not epochs:
    return config
  steps = max(1, math.ceil(epochs * train_rows / config.data.batch_size))
  config = ml_collections.ConfigDict(config_to_dict(config))
  config.train.num_steps = steps
  config.train.warmup_steps = min(int(config.train.warmup_steps), steps // 10)
  log.info("finetune.epochs=%g: %d training rows in batches of %d -> %d steps", epochs, train_rows,
           config.data.batch_size, steps)
  return config


def finetune(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Fine-tunes as `config` (a `finetune_config`) says, in `workdir`; returns the run's
  summary. Running it again resumes."""
  artifacts = pathlib.Path(workdir).absolute() / "artifacts"
  artifacts.mkdir(parents=True, exist_ok=True)
  data = open_once(lambda: open_labeled_data(config, artifacts))
  config = steps_from_labels(config, len(data.split_labels("train")))
  return train_and_evaluate(config, workdir, open_data=lambda _: data, build=build_finetune_training,
                            initial_state=lambda setup: initial_state(config, setup, data))
