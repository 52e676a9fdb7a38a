"""Reopening a finished run: its config, data module, setup and parameters, for scoring,
embedding and export.

`open_run(workdir)` reads the config saved in the latest checkpoint and rebuilds what that
run trained, with the parameters of its best step where it chose one: a pre-training run
through the loop's data module and the registry's model, a fine-tuning run (its config has
a `task`) through `finetune.py`.
"""
from __future__ import annotations

import logging
import os
import pathlib

import ml_collections

from biofm_jax.config import config_to_dict
from biofm_jax.train import finetune, loop
from biofm_jax.train.checkpoint import Checkpointer, pretrained_checkpoint
from biofm_jax.train.build import build_training

log = logging.getLogger("biofm_jax")
# Model fields that choose how the computation runs, not what it computes: a run that
# continues another (`train.init_from`) keeps its own.
COMPUTE_FIELDS = ("dtype", "remat", "attention", "layer_loop", "dropout_rate")


def with_init_run_model(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the model section of the run `config.train.init_from` names (unchanged
  where it names none): continued pre-training trains that run's architecture, whatever the
  config file's model section says, and keeps only this config's `COMPUTE_FIELDS`."""
  if not config.train.get("init_from"):
    return config
  _, _, saved = pretrained_checkpoint(config.train.init_from)
  config = ml_collections.ConfigDict(config_to_dict(config))
  model = {k: v for k, v in saved["model"].items() if k not in COMPUTE_FIELDS}
  changed = sorted(k for k, v in model.items() if config.model.get(k) != v)
  if changed:
    log.info("model from %s: %s", config.train.init_from, ", ".join(f"{k}={model[k]!r}" for k in changed))
  config.model.update(model)
  return config


def open_run(workdir: str | os.PathLike, config: ml_collections.ConfigDict | None = None):
  """(config, data module, setup, params, step) of a run's latest checkpoint (its best where
  it chose one, `checkpoint.best_metric`): pre-training,
  fine-tuning or imported public weights, with the config saved in the checkpoint unless
  `config` is given."""
  workdir = pathlib.Path(workdir).absolute()
  if not (workdir / "checkpoints").is_dir():  # before the checkpointer, which would create it
    raise FileNotFoundError(f"{workdir}: no checkpoints directory; not a training run's workdir")
  checkpointer = Checkpointer(workdir / "checkpoints", keep=1000, async_save=False)
  try:
    newest, saved = checkpointer.newest_readable(checkpointer.restore_config)
    if config is None:
      config = ml_collections.ConfigDict(saved)
    artifacts_dir = workdir / "artifacts"
    if "task" in config:  # a fine-tuning run
      data = loop.open_once(lambda: finetune.open_labeled_data(config, artifacts_dir))
      setup = finetune.build_finetune_training(config, data)
    else:
      data = loop.open_once(lambda: loop.open_data_module(config, artifacts_dir))
      setup = build_training(config, data)
    # The newest step whose parameters read too (a step cut short falls back to the one
    # before), or the run's best step where it chose one. Only the parameters: the optimiser
    # state is not needed to score, embed or export (and an imported run's holds none).
    chosen = checkpointer.chosen_step(saved)
    step, params = checkpointer.newest_readable(
        lambda s: checkpointer.restore_params(s, setup.abstract_state.params, workdir),
        at_most=newest if chosen is None else chosen)
  finally:
    checkpointer.close()
  return config, data, setup, params, step
