"""Next-event autoregressive modelling on MEDS EHR timelines (CLMBR / ETHOS style).

Run:
  python experiments/pretrain.py --config=configs/ehr_gpt.py:tiny --workdir=runs/ehr_gpt \
      --config.data.ehr.path=/path/to/meds

Same presets and data settings as `ehr_bert.py`; the stack is causal and the loss is the
next event's code (report: eval/perplexity). No masking transform runs.
"""
from biofm_jax.configs import ehr_bert


def get_config(arg=None):
  config = ehr_bert.get_config(arg)
  config.objective = dict(name="autoregressive")
  return config
