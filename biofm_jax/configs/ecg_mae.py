"""Masked-autoencoder pre-training on 12-lead ECGs (per-lead patches, ST-MEM style).

Run:
  python experiments/pretrain.py --config=configs/ecg_mae.py:tiny --workdir=runs/ecg \
      --config.data.ecg.path=/path/to/wfdb_folder_or_manifest.csv
  python experiments/evaluate.py --pretrained=runs/ecg --workdir=runs/ecg_eval --label_column=afib

`data.ecg.path` is a folder scanned for WFDB `.hea` records (each record its own subject)
or a manifest CSV with `subject_id`, `path` (to the `.hea`) and optional `split` and
numeric label columns. Empty: a synthetic cohort with a planted rhythm label (`afib`) is
generated in the workdir. Records are resampled to `sampling_rate`, leads are picked by
name (a record's missing leads are masked), each lead is standardised, and a window of
`length` samples is cropped (random in training, centred in evaluation).
Presets: tiny (CPU tests), demo (a few minutes on a CPU), base (500 Hz, 10 s, ViT-B).
"""
from biofm_jax.config import apply_model_size, base_config

MODALITY = "ecg"  # the fusion config reads this modality's sections here

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def get_config(arg=None):
  preset = arg or "tiny"
  config = base_config()
  config.data.ecg = dict(
      path="",
      leads=STANDARD_LEADS,
      sampling_rate=100.0,  # Hz, every record is resampled to it
      length=500,  # samples per training window (5 s at 100 Hz)
      patch_size=50,  # samples per patch, per lead
      mask_ratio=0.75,
      on_error="raise",  # "skip": bad records dropped at indexing, unreadable ones replaced at read time
      synthetic_subjects=300, synthetic_seed=0)
  config.model.position = "sincos"
  config.model.decoder = dict(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64)
  config.objective = dict(name="mae", norm_pix_loss=True)
  config.train.update(weight_decay=0.05, adam_b2=0.95)

  if preset == "tiny":
    apply_model_size(config, "tiny")
    config.data.ecg.update(length=250, patch_size=25, synthetic_subjects=120)
    config.data.batch_size = 16
    config.train.update(num_steps=20, warmup_steps=5, learning_rate=3e-3, log_every=5, eval_every=10,
                        eval_batches=2)
    config.checkpoint.update(every_steps=10, keep=2)
  elif preset == "demo":
    apply_model_size(config, "small")
    config.model.decoder.update(num_layers=2, embed_dim=64, num_heads=2, mlp_dim=256)
    config.data.ecg.update(synthetic_subjects=600)
    config.data.batch_size = 32
    config.train.update(num_steps=400, warmup_steps=40, learning_rate=1.5e-3, log_every=25, eval_every=200)
    config.checkpoint.update(every_steps=200)
  elif preset == "base":
    apply_model_size(config, "base")
    config.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims_saveable")
    config.model.decoder.update(num_layers=4, embed_dim=256, num_heads=8, mlp_dim=1024)
    config.data.ecg.update(sampling_rate=500.0, length=5000, patch_size=100)  # 10 s; 12 x 50 tokens
    config.data.batch_size = 256
    config.train.update(num_steps=100_000, warmup_steps=5000, learning_rate=1.5e-4, log_every=50,
                        eval_every=2000, eval_batches=20)
    config.checkpoint.update(every_steps=2000)
  else:
    raise ValueError(f"unknown preset {preset!r}: choose tiny, demo or base")
  return config
