"""Time-to-event pre-training on MEDS EHR timelines (MOTOR style).

Run:
  python experiments/pretrain.py --config=configs/ehr_motor.py:tiny --workdir=runs/ehr_motor \
      --config.data.ehr.path=/path/to/meds

Same presets and data settings as `ehr_bert.py`; the stack is causal and, from prediction
points along each timeline, a piecewise-exponential hazard head predicts when each of the
`tte_tasks` most frequent codes next occurs (`objectives/motor.py`), with
censoring at the end of the record. Fine-tune a survival (or any) task from the run with
experiments/finetune.py --pretrained=<workdir>, as from the other EHR objectives.
"""
from biofm_jax.configs import ehr_bert

# Per preset: tasks K, prediction points and first-occurrence entries per row, head rank.
_SIZES = {"tiny": (64, 8, 128, 8), "demo": (256, 16, 512, 32), "base": (8192, 32, 4096, 512),
          "large": (8192, 64, 8192, 512), "1b": (8192, 64, 8192, 512), "7b": (8192, 64, 8192, 512)}


def get_config(arg=None):
  preset = arg or "tiny"
  config = ehr_bert.get_config(preset)
  tasks, points, events, rank = _SIZES[preset]
  config.data.ehr.update(tte_tasks=tasks, tte_points=points, tte_events=events)
  # Bin start days (the last bin is open-ended); MOTOR uses eight piecewise-constant bins.
  config.objective = dict(name="time_to_event", time_bins_days=(0.0, 1.0, 7.0, 30.0, 90.0, 180.0, 365.0, 730.0),
                          rank=rank)
  return config
