"""Each modality's own code, one folder per modality; `registry.py` names them."""
