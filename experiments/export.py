"""Exports a pre-trained encoder or a fine-tuned model as a self-contained model directory.

  python experiments/export.py --workdir=runs/ehr --out=exports/ehr
  python experiments/export.py --workdir=runs/ft_high_risk --out=exports/high_risk   # a fine-tuned run

The latest checkpoint in `--workdir` is exported, with the config saved in it (or
`--config`, with the same `--config.a.b=v` overrides). `--output` picks what the model
returns: for a pre-training run the modality's own embedding by default, `fused` for the
multimodal model's fused embedding, or `contrastive:<modality>` for a contrastive
projection; for a fine-tuning run the task head's logits (`task`, the default; export.json
then holds the task: type, classes, label statistics, survival intervals) or `embedding`.
Logits are raw: apply a sigmoid / softmax, or for regression `* label_std + label_mean`
from export.json (`biofm_jax.objectives.supervised.predictions` does it with the library).

Beside the serialised function go the tokeniser (`artifacts/ehr_vocab.json`: codes and
value bins), export.json's `data` section (the run's data config: `max_len`, the window
rule) and, for a fine-tuned model, its `task` (type, classes, label columns, the
prediction-time cut), so `experiments/predict.py --exported=<out>` scores raw MEDS records
with it alone. `<out>/loader.py` loads the model with jax, numpy and flatbuffers only.
"""
from __future__ import annotations

import pathlib

from absl import flags

from biofm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("config", "", "The run's config file and preset ('' = the config saved in the checkpoint).")
flags.DEFINE_string("workdir", None, "The pre-training or fine-tuning run's workdir (checkpoints and artifacts).")
flags.DEFINE_string("out", None, "A new, empty directory for the exported model.")
flags.DEFINE_string("output", "", "'' (the data's own embedding; a fine-tuned run's task logits), 'fused', "
                    "'contrastive:<modality>', or for a fine-tuned run 'task' or 'embedding'.")
flags.mark_flags_as_required(["workdir", "out"])



def output_path(flag: str, data_module) -> str | tuple[str, ...]:
  if "task" in data_module.example_spec():  # a fine-tuned model
    return ("task", "embedding") if flag == "embedding" else ("task", "logits")
  if flag == "fused":
    return ("fused", "embedding")
  if flag.startswith("contrastive:"):
    return ("contrastive", flag.split(":", 1)[1])
  if flag:
    return flag
  return ("fused", "embedding") if data_module.name == "multimodal" else data_module.name


def main(argv, overrides):
  del argv
  import dataclasses

  from biofm_jax.config import config_to_dict, load_config
  from biofm_jax.export import export_embedding_model
  from biofm_jax.modalities.registry import model_artifact_files
  from biofm_jax.train.runs import open_run

  workdir = pathlib.Path(FLAGS.workdir).absolute()
  if not (workdir / "checkpoints").is_dir():
    cli.fail(f"{workdir} has no checkpoints directory: not a training run")
  try:
    config, data, setup, params, step = open_run(workdir, load_config(FLAGS.config, overrides) if FLAGS.config
                                                 else None)
  except (KeyError, ValueError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  inputs = {m: spec for m, spec in data.embedding_spec().items() if m != "task"}  # targets are not inputs
  metadata = {"config": FLAGS.config or "saved in the checkpoint", "overrides": overrides, "step": step,
              "workdir": str(workdir), "data": config_to_dict(config.data)}
  if isinstance(metadata["data"].get("ehr"), dict):  # configs saved before the field: the rule training applied
    metadata["data"]["ehr"].setdefault("drop_duplicates", True)
  if "task" in config:
    metadata["task"] = {"name": config.task.name, **dataclasses.asdict(data.info), "config": config_to_dict(config.task),
                        "prediction_time_cut": data.cut}
  try:
    out = export_embedding_model(setup.model, params, inputs, FLAGS.out, output=output_path(FLAGS.output, data),
                                 artifacts_dir=workdir / "artifacts",
                                 artifact_files=model_artifact_files(workdir / "artifacts"), metadata=metadata)
  except ValueError as e:  # a non-empty --out, a link among the artifacts
    cli.fail(f"{e}")
  print(f"exported step {step} of {workdir} to {out}")


if __name__ == "__main__":
  cli.run(main)
