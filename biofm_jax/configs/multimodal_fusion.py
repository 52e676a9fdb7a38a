"""Multimodal pre-training: EHR, 2D imaging, expression and imaging-derived features of the
same subjects, joined by `subject_id`, through one fused model.

Run:
  python experiments/pretrain.py --config=configs/multimodal_fusion.py:tiny --workdir=runs/fusion \
      --config.data.ehr.path=/path/to/meds --config.data.imaging.path=/path/to/manifest.csv \
      --config.data.omics.path=/path/to/bulk.h5ad --config.data.tabular.path=/path/to/features.csv

Each registered modality's section is that modality's own config section, taken from the
config that names it in `MODALITY` (ehr_bert.py, imaging_mae.py, omics_expression.py,
tabular_features.py, ...): list the ones to fuse in `data.multimodal.modalities`. With every path empty, a
synthetic cohort is generated in the workdir: one latent state per subject shapes all
four modalities, and each modality is missing for a share of subjects. With real data,
set every path of the modalities listed in `data.multimodal.modalities` (and list only
those you have).

`data.multimodal`: `require` keeps only subjects with all of the listed modalities;
`sampling` "balanced" draws each availability pattern (e.g. ehr+imaging) equally often;
`batching` "by_pattern" fills each training batch with subjects of one availability
pattern and computes only their modalities (absent modalities cost nothing; each pattern
compiles its own step, so it pays on long runs); `modality_dropout` hides a present
modality from a training example at that rate (never the last one); `mix_weights` (e.g. "ehr=2,imaging=1") switches from the per-subject join
to weighted mixing of single-modality examples (multi-task pre-training).
`model.fusion.type`: "early", "bottleneck" or "late" (see biofm_jax/models/fusion.py).
`objective`: each modality's own objective with a `weight`, plus `contrastive` alignment
("clip" softmax or "siglip" sigmoid loss) between the `pairs` of modalities.

Presets: tiny (CPU tests), demo (`make demo`: a few minutes on 2 CPU cores), base.
"""
import importlib
import pkgutil

from biofm_jax import configs
from biofm_jax.config import apply_model_size, base_config


def _modality_sections(preset: str) -> dict:
  """{modality: (data section, objective section)} from each single-modality config that
  names its MODALITY (ehr_bert.py, imaging_mae.py, ...), at `preset`."""
  sections = {}
  for module_info in pkgutil.iter_modules(configs.__path__):
    module = importlib.import_module(f"{configs.__name__}.{module_info.name}")
    modality = getattr(module, "MODALITY", None)
    if modality is not None:
      single = module.get_config(preset)
      sections[modality] = (single.data[modality].to_dict(), single.objective.to_dict())
  return sections


def get_config(arg=None):
  preset = arg or "tiny"
  if preset not in ("tiny", "demo", "base"):
    raise ValueError(f"unknown preset {preset!r}: choose tiny, demo or base")
  config = base_config()
  sections = _modality_sections("base" if preset == "base" else "tiny")
  objective = {"name": "multimodal"}
  for modality, (data, modality_objective) in sections.items():
    config.data[modality] = data
    objective[modality] = {**modality_objective, "weight": 1.0}
  config.data.multimodal = dict(
      modalities=("ehr", "imaging", "omics", "tabular"),
      require=(),  # e.g. ("ehr",): only subjects who have every listed modality
      sampling="uniform",  # or "balanced": each availability pattern equally often
      # "by_pattern": each training batch holds one availability pattern and only its
      # modalities, so absent ones cost no compute (one compiled step per pattern).
      batching="mixed",
      modality_dropout=0.1,  # per present modality and training example; never the last one
      mix_weights="",  # "" joins by subject; "ehr=2,imaging=1" mixes single-modality examples
      # e.g. ("omics",): no subject is given these, in any split (an ablation; fine-tuning
      # sets it from finetune.withhold)
      withhold=(),
      synthetic_subjects=400, synthetic_seed=0)
  config.objective = objective
  config.objective.contrastive = dict(loss="clip", weight=1.0,
                                      pairs="ehr-imaging,ehr-omics,ehr-tabular,imaging-tabular")
  config.model.decoder = dict(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64)
  # Towers: modality_layers blocks per modality; then the fusion block of model.num_layers.
  config.model.fusion = dict(type="early", modality_layers=1, num_latents=16, projection_dim=32)

  if preset == "tiny":
    apply_model_size(config, "tiny")
    config.model.num_layers = 1
    config.data.ehr.update(max_len=32)
    config.data.imaging.update(image_size=(32, 32), patch_size=(8, 8))
    config.data.omics.update(max_len=32)
    config.data.batch_size = 16
    config.train.update(num_steps=20, warmup_steps=5, learning_rate=3e-3, log_every=5, eval_every=10,
                        eval_batches=2)
    config.checkpoint.update(every_steps=10, keep=2)
  elif preset == "demo":
    config.model.update(num_layers=2, embed_dim=64, num_heads=4, mlp_dim=128)
    config.model.decoder.update(embed_dim=64, num_heads=2, mlp_dim=128)
    config.model.fusion.update(modality_layers=2, projection_dim=64)
    config.data.multimodal.synthetic_subjects = 1000
    config.data.ehr.update(max_len=64)
    # Half the patches visible: the image tower's contrastive view needs more than MAE's 25%.
    config.data.imaging.update(image_size=(32, 32), patch_size=(8, 8), mask_ratio=0.5)
    config.data.omics.update(max_len=64)
    config.data.batch_size = 64  # more in-batch negatives for the contrastive pairs
    config.train.update(num_steps=400, warmup_steps=40, learning_rate=4e-3, log_every=25, eval_every=200,
                        eval_batches=4)
    config.checkpoint.update(every_steps=200)
  else:
    apply_model_size(config, "base")
    config.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims_saveable", dropout_rate=0.1)
    config.model.decoder.update(num_layers=4, embed_dim=512, num_heads=16, mlp_dim=2048)
    config.model.fusion.update(modality_layers=6, num_latents=64, projection_dim=512)
    config.data.batch_size = 256
    # Long runs on real cohorts: absent modalities cost no compute, and the few compiles
    # (one per set of modalities) are paid once.
    config.data.multimodal.batching = "by_pattern"
    config.train.update(num_steps=100_000, warmup_steps=5000, learning_rate=1.5e-4, log_every=50,
                        eval_every=2000, eval_batches=20)
    config.checkpoint.update(every_steps=2000)
  return config
