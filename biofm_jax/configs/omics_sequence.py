"""Masked language modelling on DNA or protein sequences (Nucleotide Transformer / ESM style).

Run:
  python experiments/pretrain.py --config=configs/omics_sequence.py:tiny --workdir=runs/dna \
      --config.data.sequence.path=/path/to/sequences.fa
  python experiments/pretrain.py --config=configs/omics_sequence.py:protein --workdir=runs/protein \
      --config.data.sequence.path=/path/to/proteins.fa

DNA is tokenised as non-overlapping k-mers (`kmer=6` as in the Nucleotide Transformer;
1 = single bases), proteins as amino acids. Long sequences are cropped to `max_len`
tokens: a random window in training, the start in evaluation. Empty `path`: a synthetic
FASTA with a planted motif is generated in the workdir.
"""
from biofm_jax.config import apply_model_size, base_config

MODALITY = "sequence"  # the fusion config reads this modality's sections here


def get_config(arg=None):
  preset = arg or "tiny"
  config = base_config()
  config.data.sequence = dict(
      path="",
      alphabet="dna",  # "dna" or "protein"
      tokenizer="nucleotide",  # "nucleotide" or "amino_acid"
      kmer=6,  # non-overlapping 6-mers, as the Nucleotide Transformer; 1 = single bases
      max_len=128,  # tokens, i.e. up to 762 bases of DNA at kmer=6
      mask_rate=0.15,
      label_pattern=r"motif=(\d+)",  # a regex with one group reading a label from each header
      synthetic_records=400, synthetic_seed=0)
  config.objective = dict(name="masked", code_loss_weight=1.0, value_loss_weight=0.0)

  if preset in ("tiny", "protein"):
    apply_model_size(config, "tiny")
    if preset == "protein":
      config.data.sequence.update(alphabet="protein", tokenizer="amino_acid", kmer=1)
    config.data.batch_size = 32
    config.train.update(num_steps=20, warmup_steps=5, learning_rate=3e-3, log_every=5, eval_every=10,
                        eval_batches=0)
    config.checkpoint.update(every_steps=10, keep=2)
  elif preset == "base":
    apply_model_size(config, "base")
    config.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims_saveable")
    config.data.sequence.update(max_len=1000)
    config.data.batch_size = 256
    config.train.update(num_steps=100_000, warmup_steps=2000, learning_rate=1e-4, log_every=50,
                        eval_every=2000, eval_batches=50)
    config.checkpoint.update(every_steps=2000)
  elif preset in ("large", "1b", "7b"):  # FSDP over every device: size them with experiments/compile.py
    apply_model_size(config, preset)
    config.data.sequence.update(max_len=2048)  # 12 kb of DNA at kmer=6
    config.data.batch_size = 512
    config.train.update(num_steps=200_000, warmup_steps=5000, learning_rate=1e-4, log_every=50,
                        eval_every=5000, eval_batches=50)
    config.checkpoint.update(every_steps=2000)
  else:
    raise ValueError(f"unknown preset {preset!r}: choose tiny, protein, base, large, 1b or 7b")
  return config
