"""Every registry row and every objective honour the contracts the loop reads.

The loop asks nothing about the kind of run (`train/loop.py`): each data module brings its
training stream and data metrics, each objective its derived metrics, final evaluations and
summary lines, each model its cost. These tests walk the whole table: every row's pieces are
annotated (so `make typecheck` has something to check them against), every objective class
says whether it is causal and builds itself, and every (row, objective) pair, with the fused
model, trains a step, evaluates, saves, restores and resumes, its ahead-of-time sizing
agreeing with the data it opened.
"""
from __future__ import annotations

import inspect
import math
import sys

import numpy as np
import pytest

import helpers
from biofm_jax.modalities import registry
from biofm_jax.objectives.base import ObjectiveDefaults
from biofm_jax.train import aot

ROW_OBJECTIVES = [(name, objective) for name, row in registry.MODALITIES.items() for objective in row.objectives]


def _tiny_configs() -> dict:
  """{(modality, objective): the first tiny preset in configs/ that pre-trains it}, and
  ("multimodal", "multimodal") for the fused model."""
  found = {}
  for path in sorted((helpers.REPO / "configs").glob("*.py")):
    if path.name in ("__init__.py", "finetune.py"):
      continue
    spec = f"configs/{path.name}:tiny"
    config = helpers.config_for(spec)
    present = registry.configured(config.data)
    key = ("multimodal", "multimodal") if "multimodal" in config.data else (present[0], config.objective.name)
    found.setdefault(key, spec)
  return found


TINY = _tiny_configs()


@pytest.mark.parametrize("name", sorted(registry.MODALITIES))
def test_every_row_names_annotated_pieces_the_type_checker_can_hold_to_the_contract(name):
  """An unannotated function is `Any` to mypy, so a row naming one would pass any contract:
  each piece a row names returns an annotated type."""
  row = registry.MODALITIES[name]
  pieces = {"data": row.data, "model": row.model, "sizing": row.sizing, "reference_losses": row.reference_losses,
            "baseline.features": row.baseline.features if row.baseline else None}
  unannotated = [field for field, piece in pieces.items()
                 if piece is not None and inspect.signature(piece).return_annotation is inspect.Signature.empty]
  assert not unannotated, f"registry row {name!r}: {unannotated} have no return annotation"
  makes = sys.modules[row.data.__module__].TARGETS  # what the row's data module can add to examples
  for objective, kind in row.objectives.items():
    assert isinstance(kind.causal, bool), (name, objective)
    assert kind.targets in makes, f"{name}/{objective} needs {kind.targets!r} targets; the data makes {makes}"
    assert inspect.signature(kind.from_config).return_annotation is not inspect.Signature.empty, (name, objective)
    assert issubclass(kind, ObjectiveDefaults), f"{name}/{objective}: inherit objectives.ObjectiveDefaults"


def test_causal_objectives_build_causal_models_and_the_fused_model_refuses_them():
  ehr = {"ehr": {"vocab_size": 40, "num_value_bins": 4, "max_len": 16}}
  for spec, causal in (("configs/ehr_bert.py:tiny", False), ("configs/ehr_gpt.py:tiny", True)):
    config = helpers.config_for(spec)
    assert registry.is_causal(config.objective, ["ehr"]) is causal
    assert registry.build_model(config, ehr).cfg.causal is causal
  fused = helpers.config_for(TINY[("multimodal", "multimodal")])
  assert registry.is_causal(fused.objective, ["ehr", "imaging"]) is False
  with fused.unlocked():
    fused.objective.ehr.name = "autoregressive"
  info = {"ehr": ehr["ehr"], "imaging": {}}
  with pytest.raises(ValueError, match=r"^objective\.ehr\.name: 'autoregressive' needs a causal model"):
    registry.build_objective(fused.objective, "multimodal", info)


def test_an_unknown_objective_names_what_the_modality_trains_with():
  with pytest.raises(ValueError, match=r"^objective\.name='mae' is not one of \['autoregressive', 'masked', "
                                       r"'time_to_event'\] \(ehr trains with"):
    registry.objective_kind("mae", "ehr")
  with pytest.raises(ValueError, match=r"known objectives: \["):
    registry.objective_kind("denoise", "omics")


def test_every_row_objective_has_a_tiny_config():
  missing = sorted(set(ROW_OBJECTIVES) - set(TINY))
  assert not missing, f"no tiny preset in configs/ pre-trains {missing}: add one"


# One step, an evaluation of one batch, a checkpoint at step 1; then a resume to step 2.
WALK = {"train.num_steps": 1, "train.eval_every": 1, "train.eval_batches": 1, "train.log_every": 1,
        "checkpoint.every_steps": 1}


@pytest.mark.parametrize("modality, objective", sorted(TINY))
def test_every_row_and_objective_trains_evaluates_saves_restores_and_resumes(modality, objective, tmp_path):
  spec = TINY[(modality, objective)]
  config = helpers.config_for(spec, **{k.replace(".", "__"): v for k, v in WALK.items()})
  first = helpers.train(config, tmp_path / "run")
  assert first["steps"] == 1 and first["start_step"] == 0
  assert math.isfinite(first["train/loss"]) and math.isfinite(first["eval/loss"]), first
  # What each objective brings, through the one loop: perplexity from next-event terms, the
  # reference loss beside the model's, retrieval after contrastive alignment.
  lines = first["summary_lines"]
  if objective == "autoregressive":
    assert first["eval/perplexity"] == pytest.approx(math.exp(first["eval/code_loss"]), rel=1e-6)
  if modality == "ehr":
    assert any(line.startswith("held-out ") and " reference (" in line for line in lines), lines
  if objective == "multimodal":
    assert any(key.startswith("retrieval/") and key.endswith("/recall@10") for key in first), sorted(first)
    assert any(line.startswith("cross-modal retrieval ") for line in lines), lines

  resumed = helpers.train(helpers.config_for(spec, **{**{k.replace(".", "__"): v for k, v in WALK.items()},
                                                      "train__num_steps": 2}), tmp_path / "run")
  assert resumed["start_step"] == 1 and resumed["steps"] == 2 and math.isfinite(resumed["eval/loss"])

  data = registry.open_pretraining_data(config, tmp_path / "run" / "artifacts")
  row = registry.MODALITIES.get(modality)
  if row is not None and row.sizing is not None:  # ahead-of-time sizing agrees with the opened data
    info = data.model_info()[modality]
    stand_in = aot.abstract_data(config, int(info.get("vocab_size", 64)))
    assert _shapes(stand_in.train_example_spec()) == _shapes(data.train_example_spec())
    assert _shapes(stand_in.embedding_spec()) == _shapes(data.embedding_spec())
    sized = stand_in.model_info()[modality]
    assert {k: sized[k] for k in info if k != "tte_tasks"} == {k: info[k] for k in info if k != "tte_tasks"}


def _shapes(spec) -> dict:
  return {m: {f: (tuple(shape), np.dtype(dtype).name) for f, (shape, dtype) in fields.items()}
          for m, fields in spec.items()}
