"""Config helpers: load a config file, apply overrides, lock it, record it in a workdir.

Configs are the modules of `biofm_jax/configs/` (the repository's `configs/` links there),
each with `get_config(arg=None)` returning an
`ml_collections.ConfigDict`. The command line loads them through absl's
`config_flags` (`--config=configs/ehr_bert.py:tiny --config.train.num_steps=10`);
notebooks and tests use `load_config`, which applies the same override syntax. Either
way the result is locked: setting a field that does not exist raises an error naming it,
and `check_config` (here, the one place) refuses a value out of range, naming the field,
before any data is read.
"""
from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import json
import numbers
import os
import pathlib
import subprocess
from typing import Any, Mapping

import ml_collections
from biofm_jax import parallel

# Packages whose versions are recorded beside every run, so a result can be reproduced.
RECORDED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain",
                     "einops", "ml-collections", "numpy", "pyarrow", "meds")


def resolve_config_path(path: str) -> str:
  """`path`, or for `configs/<name>.py` from another directory the package's own config (the
  commands' defaults name configs that way)."""
  parts = pathlib.Path(path).parts
  if not os.path.exists(path) and parts[:1] == ("configs",):
    packaged = pathlib.Path(__file__).resolve().parent.joinpath("configs", *parts[1:])
    if packaged.exists():
      return str(packaged)
  return path


def load_config(spec: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """Loads `path.py[:arg]`, applies `{"train.num_steps": 10, ...}` and locks the result."""
  path, _, arg = spec.partition(":")
  path = resolve_config_path(path)
  module_spec = importlib.util.spec_from_file_location("_biofm_config", path)
  if module_spec is None or not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.lock()
  for dotted, value in (overrides or {}).items():
    set_field(config, dotted, value)
  check_config(config)
  return config


# ------------------------------------------------------------------ checked fields
def _integer(low: int):
  return lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


def _fraction_up_to_one(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool) and 0.0 < v <= 1.0  # NaN fails too


# The fields a run reads that its code would otherwise trip over later (a division by zero
# after the first step, a loop that trains nothing, a square root of a negative): checked
# in one place, before any data is read. {dotted field: (check, what it must be)}.
CHECKED_FIELDS = {
    "data.batch_size": (_integer(1), "a positive integer"),
    "data.num_workers": (_integer(0), "an integer >= 0"),
    "train.num_steps": (_integer(1), "a positive integer"),
    "train.warmup_steps": (_integer(0), "an integer >= 0"),
    "train.grad_accum_steps": (_integer(1), "a positive integer"),
    "train.log_every": (_integer(1), "a positive integer"),
    "train.eval_every": (_integer(0), "an integer >= 0 (0: never evaluate)"),
    "train.eval_batches": (_integer(0), "an integer >= 0 (0: the whole split)"),
    "checkpoint.every_steps": (_integer(1), "a positive integer"),
    "checkpoint.keep": (_integer(1), "a positive integer"),
}
# Fields that mean the same in every modality's section (`config.data.<section>.<field>`).
CHECKED_SECTION_FIELDS = {
    "max_len": (_integer(2), "an integer >= 2 (a CLS token plus one more)"),
    "mask_rate": (_fraction_up_to_one, "a fraction in (0, 1]"),
}


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises a one-line ValueError naming the first field of `CHECKED_FIELDS` (or of
  `CHECKED_SECTION_FIELDS` in any `config.data` section) whose value is out of range, e.g.
  `config.data.ehr.max_len must be an integer >= 2 ..., got -8`. Absent fields are not
  checked: configs differ in their sections."""
  sections = config.get("data", {})
  fields = dict(CHECKED_FIELDS)
  fields.update({f"data.{name}.{field}": rule for name, section in sections.items()
                 if isinstance(section, (dict, ml_collections.ConfigDict))
                 for field, rule in CHECKED_SECTION_FIELDS.items() if field in section})
  for dotted, (ok, expected) in fields.items():
    found, value = _lookup(config, dotted)
    if found and not ok(value):
      raise ValueError(f"config.{dotted} must be {expected}, got {value!r}")


def _lookup(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
  node = config
  for name in dotted.split("."):
    if not isinstance(node, (dict, ml_collections.ConfigDict)) or name not in node:
      return False, None
    node = node[name]
  return True, node


def split_config_overrides(argv: list[str]) -> tuple[list[str], dict[str, str]]:
  """Takes `--config.a.b=v` out of argv; they are applied by `load_config`, which names
  an unknown field (absl would only see an unknown flag)."""
  rest, overrides = [], {}
  for arg in argv:
    if arg.startswith("--config.") and "=" in arg:
      name, value = arg[len("--config."):].split("=", 1)
      overrides[name] = value
    else:
      rest.append(arg)
  return rest, overrides


def set_field(config: ml_collections.ConfigDict, dotted: str, value: Any) -> None:
  """Sets `a.b.c` on a locked config; an unknown field is a KeyError naming it."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, name in enumerate(parents):
    if name not in node:
      raise KeyError(f"config has no field {'.'.join(parents[:i + 1])!r} (in override {dotted!r})")
    node = node[name]
  if leaf not in node:
    raise KeyError(f"config has no field {dotted!r}; fields here: {sorted(node.keys())}")
  current = node[leaf]
  if isinstance(value, str) and not isinstance(current, str):
    value = _parse_literal(value, dotted)
  try:
    node[leaf] = value
  except TypeError as e:
    raise ValueError(f"config field {dotted!r} is {type(current).__name__} ({current!r}); "
                     f"cannot set it to {value!r}") from e


_BOOLEANS = {"true": True, "false": False}


def _parse_literal(text: str, dotted: str) -> Any:
  if text.lower() in _BOOLEANS:
    return _BOOLEANS[text.lower()]
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"cannot parse {text!r} for config field {dotted!r}") from e


def package_versions() -> dict[str, str]:
  versions = {}
  for name in RECORDED_PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = "not installed"
  return versions


def git_commit(repo_dir: str | os.PathLike | None = None) -> str:
  """The source tree's commit, with "+dirty" when it has uncommitted changes."""
  repo_dir = repo_dir or pathlib.Path(__file__).resolve().parent.parent
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True,
                            text=True, check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=repo_dir, capture_output=True, text=True, timeout=10).stdout
    return commit + ("+dirty" if dirty.strip() else "")
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def write_run_info(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> pathlib.Path:
  """Writes the resolved config, package versions and git commit to `workdir/run_info.json`.

  Each (re)start appends to `run_info.json`'s history rather than overwriting, so a run
  resumed under other versions keeps the record of both.
  """
  path = pathlib.Path(workdir) / "run_info.json"
  path.parent.mkdir(parents=True, exist_ok=True)
  history = json.loads(path.read_text())["starts"] if path.exists() else []
  history.append({"config": config_to_dict(config), "versions": package_versions(),
                  "git_commit": git_commit()})
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps({"starts": history}, indent=2, sort_keys=True))
  os.replace(tmp, path)
  (pathlib.Path(workdir) / "config.txt").write_text(str(config))
  return path


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """A JSON-safe plain dict of the config (tuples become lists)."""
  return json.loads(config.to_json())


# ------------------------------------------------------------------ shared defaults
# Model sizes shared by every experiment config; a config picks one with its argument.
MODEL_SIZES = {
    # For unit tests and CI on a CPU: compiles in seconds.
    "tiny": dict(num_layers=2, embed_dim=32, num_heads=2, mlp_dim=64),
    # For the demo on a laptop CPU: learns visibly in a few minutes.
    "small": dict(num_layers=4, embed_dim=128, num_heads=4, mlp_dim=512),
    # For real runs: 85M in the transformer, about 108M with a 15k-code vocabulary.
    "base": dict(num_layers=12, embed_dim=768, num_heads=12, mlp_dim=3072),
    # For accelerator slices; sized (ahead of time, experiments/compile.py) with FSDP_SIZES.
    "large": dict(num_layers=24, embed_dim=1024, num_heads=16, mlp_dim=4096),  # ~300M
    "1b": dict(num_layers=24, embed_dim=2048, num_heads=16, mlp_dim=8192),  # ~1.2B
    "7b": dict(num_layers=32, embed_dim=4096, num_heads=32, mlp_dim=16384),  # ~6.4B
}
# Sizes that do not fit one accelerator's memory: parameters and optimiser state are
# sharded over every device (FSDP), activations rematerialised, compute in bfloat16.
FSDP_SIZES = ("large", "1b", "7b")


# Options that public architectures need (models/layers.py, TransformerConfig, says what each
# does); these defaults are this library's own architecture, and what a run saved before the
# options existed was built with.
# Queries and keys per tile of `model.attention="blocked"` (models/blocked_attention.py):
# the fastest of those timed on this CPU at 2,048 and 4,096 slots (benchmarks/RESULTS.md).
ATTENTION_BLOCKS = (512, 256)
ARCHITECTURE_DEFAULTS = dict(bias=False, activation="gelu_tanh", norm_eps=1e-6, norm_position="pre",
                             final_norm=True, token_dropout=0.0, embedding_norm=False, mlm_head="linear",
                             cls_token=False)


def base_config() -> ml_collections.ConfigDict:
  """Sections every experiment shares: seed, model defaults, train, mesh, checkpoint, logging."""

  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model = dict(
      num_layers=2, embed_dim=32, num_heads=2, head_dim=0, mlp_dim=64, dropout_rate=0.0,
      position="rope", norm="rmsnorm", dtype="float32", param_dtype="float32",
      remat="none", scan_layers=True,
      layer_loop="auto",  # stacked layers run as "scan", "unroll" or "auto" (unrolled on CPU only)
      # "auto" (heads_first on CPU, jax's choice elsewhere), "xla", "cudnn", "heads_first" or
      # "blocked" (an online softmax over tiles of attention_blocks = (queries, keys): no
      # [T, T] matrix; "auto" picks it on CPU for rows of 2,048 slots or more)
      attention="auto", attention_blocks=ATTENTION_BLOCKS, **ARCHITECTURE_DEFAULTS)
  config.data = dict(batch_size=32, num_workers=0,
                     prepared="")  # a directory from experiments/prepare.py: read it instead of raw files
  config.train = dict(
      num_steps=1000, learning_rate=1e-3, warmup_steps=100, final_lr_fraction=0.1,
      weight_decay=0.01, adam_b1=0.9, adam_b2=0.98, grad_clip_norm=1.0, grad_accum_steps=1,
      # train/... metrics are written every log_every steps as their means over those steps
      # (train/learning_rate: the logged step's); eval_every 0 = never evaluate (no
      # periodic, final or retrieval evaluation)
      log_every=10, eval_every=200,
      eval_batches=0,  # 0 = the whole tuning split
      peak_flops_per_device=0.0,  # 0 = measure a float32 matmul on this device for MFU
      # A run folder (pre-training, or public weights from experiments/import_weights.py) whose
      # parameters start this run, and whose model section replaces this config's: continued
      # pre-training on new data. "" = a fresh initialisation.
      init_from="")
  config.mesh = dict(data=-1, fsdp=1, tensor=1, rules=parallel.DEFAULT_RULES)
  # best_metric: an evaluation figure (e.g. "eval/loss", the tuning split's loss) to choose
  # the run's best step by: a step is saved at every evaluation, the best is kept beside the
  # newest `keep`, and what reads the finished run reads the best ("" = the newest).
  # best_patience: evaluations without a better figure before training stops (0 = never).
  config.checkpoint = dict(every_steps=200, keep=3, async_save=True, best_metric="", best_mode="min",
                           best_patience=0)
  return config


def apply_model_size(config: ml_collections.ConfigDict, size: str) -> None:
  """Sets the model's size; the FSDP sizes also shard the state over every device, keep
  only the layer inputs for the backward pass, and compute in bfloat16."""
  if size not in MODEL_SIZES:
    raise ValueError(f"unknown model size {size!r}; choose one of {sorted(MODEL_SIZES)}")
  config.model.update(MODEL_SIZES[size])
  if size in FSDP_SIZES:
    config.model.update(dtype="bfloat16", remat="full")
    config.mesh.update(data=1, fsdp=-1, tensor=1)


# The masked-autoencoder recipe (He et al. 2022, as RETFound and ST-MEM train it) shared by
# the patch modalities' configs (`configs/imaging_mae.py`, `configs/ecg_mae.py`): a light
# decoder per preset, the normalised-pixel loss, AdamW's b2 0.95 and weight decay 0.05.
MAE_DECODERS = {
    "tiny": dict(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64),
    "demo": dict(num_layers=2, embed_dim=64, num_heads=2, mlp_dim=256),
    "base": dict(num_layers=8, embed_dim=512, num_heads=16, mlp_dim=2048),
}


def mae_config(preset: str, presets: tuple[str, ...] = ("tiny", "demo", "base")) -> ml_collections.ConfigDict:
  """The MAE recipe at `preset` (one of `presets`; the FSDP sizes shard over every device):
  model size, decoder, objective, optimiser, batch and schedule. The modality's config adds
  its data section and what differs per modality (image or record sizes, a wider batch)."""
  if preset not in presets:
    raise ValueError(f"unknown preset {preset!r}: choose {', '.join(presets)}")
  config = base_config()
  config.model.position = "sincos"
  config.model.decoder = dict(MAE_DECODERS["tiny"])
  config.objective = dict(name="mae", norm_pix_loss=True)
  config.train.update(weight_decay=0.05, adam_b2=0.95)
  if preset == "tiny":
    apply_model_size(config, "tiny")
    config.data.batch_size = 16
    config.train.update(num_steps=20, warmup_steps=5, learning_rate=3e-3, log_every=5, eval_every=10,
                        eval_batches=2)
    config.checkpoint.update(every_steps=10, keep=2)
  elif preset == "demo":
    apply_model_size(config, "small")
    config.model.decoder.update(MAE_DECODERS["demo"])
    config.data.batch_size = 32
    config.train.update(num_steps=400, warmup_steps=40, learning_rate=1.5e-3, log_every=25, eval_every=200)
    config.checkpoint.update(every_steps=200)
  elif preset == "base":
    apply_model_size(config, "base")
    config.model.update(dtype="bfloat16", remat="dots_with_no_batch_dims_saveable")
    config.model.decoder.update(MAE_DECODERS["base"])
    config.data.batch_size = 256
    config.train.update(num_steps=100_000, warmup_steps=5000, learning_rate=1.5e-4, log_every=50,
                        eval_every=2000, eval_batches=20)
    config.checkpoint.update(every_steps=2000)
  else:  # an FSDP size: size it first with experiments/compile.py
    apply_model_size(config, preset)
    config.model.decoder.update(MAE_DECODERS["base"])
    config.train.update(num_steps=200_000, warmup_steps=10_000, learning_rate=1.5e-4, log_every=50,
                        eval_every=5000, eval_batches=20)
    config.checkpoint.update(every_steps=2000)
  return config
