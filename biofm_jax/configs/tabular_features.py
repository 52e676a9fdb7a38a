"""Masked-feature pre-training on a table of imaging-derived features (radiomics, cell
morphology) with missing values, FT-Transformer style: one token per column.

Run:
  python experiments/pretrain.py --config=configs/tabular_features.py:tiny --workdir=runs/tabular \
      --config.data.tabular.path=/path/to/features.csv \
      --config.data.tabular.label_columns="('diagnosis',)"

`path` is a CSV or parquet file (or a folder of parquet files) with an id column, one
column per feature and optionally a `split` column; label columns are kept out of the
features (they are for probes). Empty: a synthetic radiomics-like table is generated.
A European CSV (";" between fields, "3,5" for numbers) reads with
  --config.data.tabular.delimiter=";" --config.data.tabular.decimal=","
"""
from biofm_jax.config import apply_model_size, base_config

MODALITY = "tabular"  # the fusion config reads this modality's sections here


def get_config(arg=None):
  preset = arg or "tiny"
  config = base_config()
  config.data.tabular = dict(
      path="",
      id_column="subject_id",
      label_columns=(),  # kept out of the features, used by probes; () = those a generated table declares
      delimiter="",  # CSV delimiter; "" detects , ; tab or |
      decimal=".",  # decimal mark of numbers in a CSV: "." or "," (a European CSV: decimal=",", delimiter=";")
      categorical_columns=(),  # () = auto: boolean and mostly-text columns are categorical
      exclude_columns=(),
      min_category_count=3,  # rarer categories in the training split become "unseen" (id 0)
      mask_rate=0.3,
      synthetic_rows=600, synthetic_seed=0)
  # A column's identity is in its own embedding weights: no position encoding.
  config.model.position = "none"
  config.objective = dict(name="masked_features", category_loss_weight=1.0)

  if preset == "tiny":
    apply_model_size(config, "tiny")
    config.data.batch_size = 32
    config.train.update(num_steps=20, warmup_steps=5, learning_rate=3e-3, log_every=5, eval_every=10,
                        eval_batches=0)
    config.checkpoint.update(every_steps=10, keep=2)
  elif preset == "base":
    # FT-Transformer's default size: 3 blocks of width 192.
    config.model.update(num_layers=3, embed_dim=192, num_heads=8, mlp_dim=256, dropout_rate=0.1)
    config.data.batch_size = 256
    config.train.update(num_steps=20_000, warmup_steps=500, learning_rate=1e-4, weight_decay=1e-5,
                        log_every=50, eval_every=1000)
    config.checkpoint.update(every_steps=1000)
  else:
    raise ValueError(f"unknown preset {preset!r}: choose tiny or base")
  return config
