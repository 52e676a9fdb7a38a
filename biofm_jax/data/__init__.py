"""Data: random-access sources per format, modality transforms and the Grain pipeline."""
