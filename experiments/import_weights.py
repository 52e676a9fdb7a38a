"""Brings a public foundation model's weights into biofm_jax as an ordinary run folder.

  python experiments/import_weights.py --from=/models/esm2_t6_8M_UR50D --format=esm2 --out=runs/esm2_8m

`--from` is a local Hugging Face model folder (`config.json`, `model.safetensors` or a
sharded `model.safetensors.index.json`, and `vocab.txt` where the model has one); nothing
is downloaded. Only safetensors are read: a folder with `pytorch_model.bin` alone is
refused with a hint (`save_pretrained(..., safe_serialization=True)` writes safetensors).

`--out` becomes a run folder at step 0 (checkpoint, vocabulary artifact, config), so every
command that takes a run takes it:
  continue pre-training on your sequences:
    python experiments/pretrain.py --config=configs/omics_sequence.py:protein --workdir=runs/mine \
        --config.train.init_from=runs/esm2_8m --config.data.sequence.path=my_proteins.fa
  probe, fine-tune, export: --pretrained=runs/esm2_8m / --workdir=runs/esm2_8m.
Fields of the run's config can be set here too (`--config.data.sequence.path=...`).

Formats: esm2 (ESM-2, `EsmForMaskedLM`). Nucleotide Transformer, Geneformer, ViT-MAE and
timm ViT are planned and refused by name.
"""
from __future__ import annotations

from absl import flags

from biofm_jax import cli

FLAGS = flags.FLAGS
flags.DEFINE_string("from", None, "A local Hugging Face model folder.")
flags.DEFINE_string("format", None, "The folder's model: esm2.")
flags.DEFINE_string("out", None, "A new, empty folder for the run.")
flags.DEFINE_integer("max_len", 1024, "Tokens per sequence (CLS included) of the run's data config.")
flags.mark_flags_as_required(["from", "format", "out"])


def main(argv, overrides):
  del argv
  from biofm_jax.weights.formats import import_folder

  try:
    out = import_folder(FLAGS.format, getattr(FLAGS, "from"), FLAGS.out, max_len=FLAGS.max_len,
                        overrides={k.removeprefix("config."): v for k, v in overrides.items()})
  except (KeyError, ValueError, FileNotFoundError) as e:
    cli.fail(f"{e}")
  print(f"imported {FLAGS.format} weights into {out}")


if __name__ == "__main__":
  cli.run(main)
