"""Public foundation models' weights in and out: ESM-2 (and, next, Nucleotide Transformer,
Geneformer, ViT-MAE) read from their Hugging Face folders into ordinary biofm_jax run
folders, without torch and without running anything stored on disk.

  tensors.py     reads safetensors files (one, or sharded with an index) tensor by tensor
  conversion.py  a format's name map and value hooks, streamed into our parameter tree
  esm2.py        ESM-2 (`EsmForMaskedLM`): config, parameter names, vocabulary
  run_folder.py  writes the converted parameters as a run folder every command opens
  formats.py     the formats `experiments/import_weights.py --format` knows
"""
