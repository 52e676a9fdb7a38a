"""Models: Flax Linen layers, the transformer stack, modality encoders and heads."""
