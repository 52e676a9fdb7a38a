"""The ehr modality: everything it owns (see `biofm_jax/modalities/registry.py`)."""
