"""Masked code modelling on MEDS EHR timelines (BEHRT / CEHR-BERT style).

Run:
  python experiments/pretrain.py --config=configs/ehr_bert.py:tiny --workdir=runs/ehr_bert \
      --config.data.ehr.path=/path/to/meds --config.train.num_steps=200

Arguments after the colon pick a preset:
  tiny  - unit tests and CI on a CPU (seconds)
  demo  - `make demo`: a small model on a generated cohort, a few minutes on 2 CPU cores
  base  - about 100M parameters, for accelerators
  large, 1b, 7b - about 0.3B, 1.2B and 6.4B parameters, FSDP over every device, bf16 compute
          (check what a slice needs first: experiments/compile.py)
With `data.ehr.path` empty, a synthetic MEDS cohort is generated into the workdir.
"""
from biofm_jax.config import apply_model_size, base_config

MODALITY = "ehr"  # the fusion config reads this modality's sections here
# What the `demo` and `base` presets feed each token: each value's quantile within its code
# and the days since the previous event, beside the bins, age and offset (on the order/trend
# cohort they lift the next-event and MOTOR probes by about 0.1 AUROC: benchmarks/RESULTS.md)
MEASURED_INPUTS = dict(value_inputs="bins+quantile", time_inputs="age+offset+gap")


def get_config(arg=None):
  preset = arg or "tiny"
  config = base_config()
  config.data.ehr = dict(
      path="",  # a MEDS dataset directory; "" generates a synthetic cohort in the workdir
      # "": read the MEDS data into memory; "auto": index it once into an on-disk event store
      # under the run's artifacts and read records from there (memory does not grow with the
      # rows); a path: a store built by experiments/index_meds.py (multi-host runs)
      event_store="",
      # rows equal to an earlier row of the subject (time, code, value), in any file, are
      # dropped (and counted) by both readers; scoring an export applies the same setting
      drop_duplicates=True,
      synthetic_subjects=2000, synthetic_seed=0,
      max_len=128,  # tokens per timeline including the CLS token
      window="recent",  # evaluation: the most recent events of long timelines ("earliest" for the first)
      # training: "cover" cuts long timelines into windows that hold every event each epoch
      # (consecutive, sharing `window_overlap` of their room with the next); "one": one window
      train_windows="cover", window_overlap=0.25,
      # several windows per row of max_len tokens (attention, positions and targets kept
      # apart), so short timelines stop paying for padding; batch_size then counts rows
      pack=False,
      min_code_count=5,  # codes seen fewer times in the training split become [UNK]
      num_value_bins=10,  # per-code quantile bins of numeric values
      # what a token sees of its value: its bin ("bins"), or also its exact quantile among the
      # code's training values ("bins+quantile"), so small moves within a bin stay visible
      value_inputs="bins",
      # what a token sees of time: its age and days since the window's first event
      # ("age+offset"), or also the days since the previous event ("age+offset+gap")
      time_inputs="age+offset",
      mask_rate=0.15)
  config.objective = dict(name="masked", code_loss_weight=1.0, value_loss_weight=0.5)

  if preset == "tiny":
    apply_model_size(config, "tiny")
    config.data.ehr.update(max_len=32, synthetic_subjects=300, min_code_count=2)
    config.data.batch_size = 16
    config.train.update(num_steps=20, warmup_steps=5, learning_rate=1e-2, log_every=5, eval_every=10,
                        eval_batches=2)
    config.checkpoint.update(every_steps=10, keep=2)
  elif preset == "demo":
    apply_model_size(config, "small")
    # The inputs that measured best on the order/trend cohort (benchmarks/RESULTS.md)
    config.data.ehr.update(max_len=64, synthetic_subjects=2000, **MEASURED_INPUTS)
    config.data.batch_size = 32
    config.train.update(num_steps=600, warmup_steps=50, learning_rate=3e-3, log_every=25, eval_every=200)
    config.checkpoint.update(every_steps=200)
  elif preset == "base":
    apply_model_size(config, "base")
    config.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims_saveable", dropout_rate=0.1)
    config.data.ehr.update(max_len=512, min_code_count=10, pack=True, **MEASURED_INPUTS)
    config.data.batch_size = 256
    config.train.update(num_steps=100_000, warmup_steps=2000, learning_rate=3e-4, log_every=50,
                        eval_every=2000, eval_batches=50)
    config.checkpoint.update(every_steps=2000)
  elif preset in ("large", "1b", "7b"):  # FSDP over every device: size them with experiments/compile.py
    apply_model_size(config, preset)
    config.data.ehr.update(max_len=1024, min_code_count=10, pack=True)
    config.data.batch_size = 512
    config.train.update(num_steps=200_000, warmup_steps=2000, learning_rate=2e-4, log_every=50,
                        eval_every=5000, eval_batches=50)
    config.checkpoint.update(every_steps=2000)
  else:
    raise ValueError(f"unknown preset {preset!r}: choose tiny, demo, base, large, 1b or 7b")
  return config
