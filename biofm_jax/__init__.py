"""biofm_jax: pre-training multimodal biomedical foundation models in JAX."""

__version__ = "0.1.0"
