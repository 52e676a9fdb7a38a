"""Exports the encoder of a pre-training run as a self-contained model directory.

  python experiments/export.py --config=configs/ehr_bert.py:tiny --workdir=runs/ehr --out=exports/ehr

`--config` (with the same `--config.a.b=v` overrides) is the run's config; the latest
checkpoint in `--workdir` is exported. `--output` picks the embedding: the modality's own
by default, `fused` for the multimodal model's fused embedding, or a modality name after
`contrastive:` for its contrastive projection (e.g. `contrastive:ehr`). Load it with
`biofm_jax.export.load_exported(out)`: it runs on tokenised batches with jax and numpy only.
"""
from __future__ import annotations

import logging
import pathlib
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "The run's config file and preset, e.g. configs/ehr_bert.py:tiny.")
flags.DEFINE_string("workdir", None, "The pre-training run's workdir (checkpoints and artifacts).")
flags.DEFINE_string("out", None, "A new, empty directory for the exported model.")
flags.DEFINE_string("output", "", "'' (the data's own embedding), 'fused', or 'contrastive:<modality>'.")
flags.mark_flags_as_required(["config", "workdir", "out"])

from biofm_jax.config import split_config_overrides  # noqa: E402


def output_path(flag: str, data_module) -> str | tuple[str, ...]:
  if flag == "fused":
    return ("fused", "embedding")
  if flag.startswith("contrastive:"):
    return ("contrastive", flag.split(":", 1)[1])
  if flag:
    return flag
  return ("fused", "embedding") if data_module.name == "multimodal" else data_module.name


def main(argv, overrides):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", force=True,
                      stream=sys.stdout)
  from biofm_jax.config import load_config
  from biofm_jax.export import export_embedding_model
  from biofm_jax.train.checkpoint import Checkpointer
  from biofm_jax.train.loop import open_data_module
  from biofm_jax.train.setup import batch_spec, build_training

  try:
    config = load_config(FLAGS.config, overrides)
  except (KeyError, ValueError, FileNotFoundError) as e:
    sys.exit(f"error in --config: {e}")
  workdir = pathlib.Path(FLAGS.workdir)
  checkpoints = Checkpointer(workdir / "checkpoints", keep=1)
  step = checkpoints.latest_step()
  if step is None:
    sys.exit(f"error: no checkpoint in {workdir / 'checkpoints'}")
  data = open_data_module(config, workdir / "artifacts")
  setup = build_training(config, data)
  params = checkpoints.restore_state(step, setup.abstract_state).params
  out = export_embedding_model(setup.model, params, batch_spec(data, embedding=True), FLAGS.out,
                               output=output_path(FLAGS.output, data), artifacts_dir=workdir / "artifacts",
                               metadata={"config": FLAGS.config, "overrides": overrides, "step": step,
                                         "workdir": str(workdir.absolute())})
  print(f"exported step {step} of {workdir} to {out}")


if __name__ == "__main__":
  _argv, _overrides = split_config_overrides(sys.argv)
  app.run(lambda argv: main(argv, _overrides), argv=_argv)
