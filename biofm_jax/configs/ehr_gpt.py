"""Next-event autoregressive modelling on MEDS EHR timelines (CLMBR / ETHOS style).

Run:
  python experiments/pretrain.py --config=configs/ehr_gpt.py:tiny --workdir=runs/ehr_gpt \
      --config.data.ehr.path=/path/to/meds

Same presets and data settings as `ehr_bert.py`; the stack is causal and the loss is the
next event's code (report: eval/perplexity) and the gap to it, as one of the classes
`gap_edges_days` cuts (so the model can generate timelines with times: biofm_jax/generate.py).
No masking transform runs.
"""
from biofm_jax.configs import ehr_bert


def get_config(arg=None):
  config = ehr_bert.get_config(arg)
  # Gap classes: the same time, up to an hour, a day, a week, a month, three months, a year, more.
  config.objective = dict(name="autoregressive", gap_edges_days=(0.0, 1 / 24, 1.0, 7.0, 30.0, 90.0, 365.0),
                          time_loss_weight=1.0)
  return config
