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
from biofm_jax.config import mae_config

MODALITY = "ecg"  # the fusion config reads this modality's sections here

STANDARD_LEADS = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")


def get_config(arg=None):
  preset = arg or "tiny"
  config = mae_config(preset)  # the MAE recipe shared with imaging
  # Reconstruct each masked patch as it is, not after removing its mean and scale (MAE's
  # norm_pix_loss, which images keep): a patch is half a second of one lead, so whether and
  # where it holds a beat is what the raw target asks for, and beat spacing is the rhythm.
  # Measured (benchmarks/RESULTS.md, 10 s windows): atrial-fibrillation probe 0.655 -> 0.736,
  # fine-tuned 600 steps 0.922 -> 0.955.
  config.objective.norm_pix_loss = False
  config.data.ecg = dict(
      path="",
      leads=STANDARD_LEADS,
      sampling_rate=100.0,  # Hz, every record is resampled to it
      length=500,  # samples per training window (5 s at 100 Hz)
      patch_size=50,  # samples per patch, per lead
      mask_ratio=0.75,
      on_error="raise",  # "skip": bad records dropped at indexing, unreadable ones replaced at read time
      synthetic_subjects=300, synthetic_seed=0)
  if preset == "tiny":
    config.data.ecg.update(length=250, patch_size=25, synthetic_subjects=120)
  elif preset == "demo":
    config.data.ecg.update(synthetic_subjects=600)
  elif preset == "base":
    config.model.decoder.update(num_layers=4, embed_dim=256, num_heads=8, mlp_dim=1024)
    config.data.ecg.update(sampling_rate=500.0, length=5000, patch_size=100)  # 10 s; 12 x 50 tokens
  return config
