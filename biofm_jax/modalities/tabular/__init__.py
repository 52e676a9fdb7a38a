"""The tabular modality: everything it owns (see `biofm_jax/modalities/registry.py`)."""
