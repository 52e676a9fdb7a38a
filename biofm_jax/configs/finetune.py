"""Fine-tuning a pre-trained model on a labelled task: MEDS labels for EHR, a label column
the records carry for images, ECGs, cells, sequences and tables.

Run:
  python experiments/finetune.py --config=configs/finetune.py:high_risk --pretrained=runs/ehr_bert \
      --workdir=runs/ft --config.task.labels=/path/to/labels.parquet
  python experiments/finetune.py --config=configs/finetune.py:binary --pretrained=runs/mae2d \
      --workdir=runs/ft_lesion --config.task.label_column=lesion

The model, data and objective sections come from the pre-training run (`--pretrained`), so
the backbone and tokenisation are exactly the pre-trained ones; this file sets the task,
how to adapt (full / frozen / lora), the optimiser and the checkpoints. The argument picks
a task preset: `binary` for your own labels (`task.labels`, e.g. an ACES output folder; set
`task.type` for other kinds; it starts the head at the logistic probe and trains the
backbone at 0.3 of the head's learning rate, LP-FT, which measured best on the EHR
order/trend cohort, for 600 steps of which the step with the lowest tuning loss stands for
the run: early stopping), or one for the synthetic cohort (`task.synthetic`, used when
`task.labels` is empty): high_risk (binary), mortality (binary, rare), risk (regression), survival
(time to event with a planted hazard). Add `,tiny` (e.g. `high_risk,tiny`) for the
CPU-sized schedule that tests use. The `model` fields are unset (taken from the
checkpoint); one set here pins what the checkpoint must have (e.g.
`--config.model.num_layers=12` fails clearly on a 2-layer checkpoint).
"""
import ml_collections

from biofm_jax.config import base_config

TASKS = {
    "binary": dict(type="binary"),  # your own labels: --config.task.labels=<file or ACES task folder>
    "high_risk": dict(type="binary", synthetic="high_risk"),
    "mortality": dict(type="binary", synthetic="mortality"),
    "risk": dict(type="regression", synthetic="risk"),
    "survival": dict(type="survival", synthetic="planted_survival"),
}


def get_config(arg=None):
  task_name, _, size = (arg or "high_risk").partition(",")
  if task_name not in TASKS:
    raise ValueError(f"unknown task preset {task_name!r}: choose one of {sorted(TASKS)}")
  base = base_config()
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(batch_size=32, num_workers=0)
  config.train = base.train
  config.mesh = base.mesh
  config.checkpoint = base.checkpoint
  # The model comes from the checkpoint; a field set here (e.g. --config.model.num_layers=12)
  # pins what the checkpoint must have, and a mismatch is an error naming it.
  config.model = {name: None for name in base.model.keys()}
  config.task = dict(
      name="",  # the report's title; "" = the labels' name (ACES task folder or file stem)
      type="binary",
      labels="",  # a MEDS labels parquet file (or directory); "" uses task.synthetic
      synthetic="", synthetic_censor_fraction=0.0,  # labels for a synthetic pre-training cohort
      value_column="",  # "" = the MEDS default for the type (boolean_value, float_value, ...)
      label_columns=(),  # multilabel: the boolean columns
      # Record modalities (images, ECGs, cells, sequences, table rows): the label column the
      # records carry (config.data.<modality>.label_columns), e.g. --config.task.label_column=lesion
      label_column="",
      classes=(),  # multiclass: class names in id order ("" = sorted values)
      time_column="", event_column="",  # survival ("" = float_value, boolean_value)
      # A label row's input: the events at or before its prediction_time (meds.LabelSchema's
      # rule, "inclusive"), or "strict": only those strictly before it.
      prediction_time_cut="inclusive",
      # Rows naming unknown subjects or with no event the cut keeps are dropped and counted;
      # True makes them an error (experiments/*.py --strict_labels).
      strict_labels=False,
      num_time_bins=8,  # survival: discrete-time intervals, equal numbers of training events
      embedding="",  # the backbone output to put the head on ("" = <modality>/embedding)
      # "summary": the head reads that output; "attention": learned queries pool the hidden
      # states of its modality (an attentive probe in frozen mode)
      pooling="summary")
  config.task.update(TASKS[task_name])
  config.finetune = dict(
      pretrained="",  # set from --pretrained
      init="pretrained",  # or "scratch": the same architecture from random initialisation
      mode="full",  # full | frozen (head only) | lora (low-rank adapters + head)
      lora_rank=8, lora_alpha=16.0, head_dropout=0.1,
      # how the head starts: "zeros" (every task at its prior) or "probe": a logistic probe
      # fitted on the training rows' pre-trained embeddings, then fine-tuned (LP-FT)
      head_init="zeros",
      backbone_lr_scale=1.0,  # full mode: the backbone's learning rate as a multiple of the head's
      train_labels_per_class=0,  # > 0: few-shot, k training labels per class (k rows for others)
      # > 0: train.num_steps from the label count, epochs x training rows / batch (rounded up)
      epochs=0.0,
      # a fused model: modalities no subject is given, in training and every evaluation
      # (an ablation: what the others carry alone), e.g. ("ehr", "tabular")
      withhold=(),
      label_seed=0)
  config.train.update(num_steps=300, warmup_steps=30, learning_rate=3e-4, weight_decay=0.01, log_every=25,
                      eval_every=100, eval_batches=0)
  config.checkpoint.update(every_steps=100, keep=2)
  if size == "tiny":
    config.data.batch_size = 16
    config.train.update(num_steps=60, warmup_steps=5, learning_rate=3e-3, log_every=10, eval_every=30)
    config.checkpoint.update(every_steps=30)
  elif size:
    raise ValueError(f"unknown size {size!r}: add ',tiny' or nothing")
  if task_name == "binary":  # your own labels: the recipe that measured best (benchmarks/RESULTS.md)
    config.finetune.update(head_init="probe", backbone_lr_scale=0.3)
    if not size:
      # 600 steps with the step of lowest tuning loss standing for the run: record models
      # need the length (ECG atrial fibrillation 0.840 at 300 steps, 0.922 at 600), and EHR
      # models, whose tuning loss is lowest near step 250, are kept from overfitting.
      config.train.update(learning_rate=1e-3, num_steps=600, eval_every=50)
      config.checkpoint.update(best_metric="eval/loss")
  return config
