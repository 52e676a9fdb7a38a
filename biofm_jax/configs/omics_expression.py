"""Masked-expression pre-training on single-cell gene expression (scGPT / Geneformer style).

Run:
  python experiments/pretrain.py --config=configs/omics_expression.py:tiny --workdir=runs/expression \
      --config.data.omics.path=/path/to/cells.h5ad

`tokenization` picks the recipe:
  binned - scGPT: each cell's top genes as tokens with a per-cell quantile bin of their
           expression; the objective hides bins and predicts them (gene tokens stay visible);
  rank   - Geneformer: genes ordered by expression normalised by each gene's median over
           the training cells; the objective masks gene tokens and predicts them.
`backed=True` reads the .h5ad lazily, for files larger than memory. Empty `path`: a
synthetic AnnData with cell types and marker genes is generated in the workdir.
"""
from biofm_jax.config import apply_model_size, base_config

MODALITY = "omics"  # the fusion config reads this modality's sections here


def get_config(arg=None):
  preset = arg or "tiny"
  config = base_config()
  config.data.omics = dict(
      path="",  # an .h5ad file or a TileDB-SOMA experiment folder (read out of core)
      backed=False,
      measurement="RNA",  # SOMA: the measurement; its X layer is `layer` ("" = "data")
      shuffle_buffer_blocks=8,  # SOMA: blocks of 1,024 cells shuffled together while training
      layer="",  # "" = X; else the name of a layer holding raw counts
      gene_column="",  # "" = var_names; else a var column with gene ids
      gene_id_map="",  # a CSV mapping the file's gene ids to the vocabulary's (e.g. Ensembl -> symbol)
      min_vocab_coverage=0.5,
      highly_variable_genes=0,  # > 0: read only this many highly-variable genes (Seurat v3, raw counts)  # the vocabulary must know genes holding this share of the counts
      label_columns=("cell_type",),  # obs columns kept for probes
      tokenization="binned",  # "binned" (scGPT) or "rank" (Geneformer)
      max_len=64,  # tokens per cell including CLS
      num_value_bins=16,
      normalize_total=1e4,  # library-size normalisation target; 0 = off
      log1p=True,
      mask_rate=0.25,
      synthetic_cells=600, synthetic_seed=0)
  config.objective = dict(name="masked", code_loss_weight=0.0, value_loss_weight=1.0)

  if preset in ("tiny", "tiny_rank"):
    apply_model_size(config, "tiny")
    if preset == "tiny_rank":
      config.data.omics.tokenization = "rank"
      config.objective.update(code_loss_weight=1.0, value_loss_weight=0.0)
    config.data.batch_size = 32
    config.train.update(num_steps=20, warmup_steps=5, learning_rate=1e-2, log_every=5, eval_every=10,
                        eval_batches=0)
    config.checkpoint.update(every_steps=10, keep=2)
  elif preset == "base":
    apply_model_size(config, "base")
    config.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims_saveable", dropout_rate=0.1)
    config.data.omics.update(max_len=1200, num_value_bins=51)
    config.data.batch_size = 64
    config.train.update(num_steps=100_000, warmup_steps=2000, learning_rate=1e-4, log_every=50,
                        eval_every=2000, eval_batches=50)
    config.checkpoint.update(every_steps=2000)
  else:
    raise ValueError(f"unknown preset {preset!r}: choose tiny, tiny_rank or base")
  return config
