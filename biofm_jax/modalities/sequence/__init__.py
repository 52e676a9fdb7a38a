"""The sequence modality: everything it owns (see `biofm_jax/modalities/registry.py`)."""
