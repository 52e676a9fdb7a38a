"""The 12-lead ECG modality (WFDB waveforms): everything it owns (see
`biofm_jax/modalities/registry.py`).

  source.py     WFDB records found in a folder or a manifest CSV, checked from their headers
  data.py       resampling, lead selection, per-lead normalisation, crops, MAE masking: ECGData
  model.py      per-lead 1D patches -> tokens with lead and time positions; the MAE decoder
  mae.py        reconstruction of the masked patches of the leads a record has
  baseline.py   RR-interval and amplitude features for the classical baseline of probes
  synthetic.py  WFDB records with a planted rhythm (sinus or atrial fibrillation)
"""
