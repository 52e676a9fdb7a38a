"""Experiment configs: `get_config(preset)` -> a ConfigDict, one module per experiment.

Importable (`from biofm_jax.configs import ehr_bert`) and loadable by path, as the
command line does (`--config=configs/ehr_bert.py:tiny`; the repository's `configs/` is
this folder). A single-modality config names its modality in `MODALITY`: the multimodal
fusion config takes that modality's data and objective sections from it.
"""
