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
prediction-time cut; for a record model, the label column's values behind the class ids),
so `experiments/predict.py --exported=<out>` scores raw MEDS records, or raw records of the
modality (`--records`), with it alone. The work is `biofm_jax.export.export_run`.
`<out>/loader.py` loads the model with jax, numpy and flatbuffers only.

  python experiments/export.py --workdir=runs/esm2_mine --out=exports/esm2_mine_hf --format=hf

publishes a run in the public format its users load instead (`biofm_jax/weights/publish.py`):
`transformers.EsmForMaskedLM.from_pretrained(out)` for a protein masked language model with
ESM-2's architecture (imported with experiments/import_weights.py, or pre-trained with it),
`BertForMaskedLM` plus Geneformer's dictionaries for an expression model with Geneformer's,
`ViTMAEModel` for a 2-D imaging MAE with ViT's encoder; a run no public class computes
exactly is refused with the option that differs.

A fine-tuned run's export carries its model card (`MODEL_CARD.md`, and the same facts in
export.json's `model_card`; `biofm_jax/eval/model_card.py`): the task and label definition, a
fingerprint of the data it was trained on (file counts, bytes, hashes; cohort counts per
split; never a subject id), the pre-training and fine-tuning configs, the held-out figures
(`--report=<evaluate.py --finetuned output>` adds intervals, subgroups and baselines) and the
limits those figures show.
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
flags.DEFINE_string("report", "", "A fine-tuned run's evaluation (evaluate.py --finetuned's output folder): its "
                    "held-out figures, intervals, subgroups and baselines go into the model card.")
flags.DEFINE_string("format", "", "'' (a jax.export model directory, as above) or 'hf': the run's parameters "
                    "as the public Hugging Face class that computes them (EsmForMaskedLM for proteins, "
                    "Geneformer's BertForMaskedLM for cells, ViTMAEModel for 2-D images), loadable with "
                    "transformers.")
flags.mark_flags_as_required(["workdir", "out"])



def main(argv, overrides):
  del argv
  from biofm_jax.config import load_config
  from biofm_jax.export import export_run

  if FLAGS.format:
    from biofm_jax.weights.publish import publish_run
    try:
      out = publish_run(FLAGS.workdir, FLAGS.out, FLAGS.format)
    except (KeyError, ValueError, FileNotFoundError) as e:  # a model no public class computes, a used --out
      cli.fail(f"{e}")
    print(f"published {pathlib.Path(FLAGS.workdir).absolute()} as a Hugging Face model in {out}")
    return
  try:
    config = load_config(FLAGS.config, overrides) if FLAGS.config else None
    out, step = export_run(FLAGS.workdir, FLAGS.out, output=FLAGS.output, config=config, report=FLAGS.report or None,
                           provenance={"config": FLAGS.config or "saved in the checkpoint", "overrides": overrides})
  except (KeyError, ValueError, FileNotFoundError) as e:  # not a run, a non-empty --out, a link among the artifacts
    cli.fail(f"{e}")
  print(f"exported step {step} of {pathlib.Path(FLAGS.workdir).absolute()} to {out}")


if __name__ == "__main__":
  cli.run(main)
