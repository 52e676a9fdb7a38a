"""ViT-MAE in: a `ViTMAEForPreTraining` folder imports as a 2-D imaging run whose encoder
gives ViT-MAE's hidden states (CLS and every patch) for the same pixels, and fine-tunes on
an image label (RETFound's use: a pre-trained ViT encoder adapted to detect a finding).

Nothing downloads: the test builds a small random ViTMAEForPreTraining with torch on the CPU.
"""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from biofm_jax.config import load_config  # noqa: E402
from biofm_jax.data import batch as B  # noqa: E402
from biofm_jax.train.runs import open_run  # noqa: E402
from biofm_jax.weights.formats import import_folder  # noqa: E402

import helpers  # noqa: E402


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
  root = tmp_path_factory.mktemp("vit_mae")
  torch.manual_seed(0)
  config = transformers.ViTMAEConfig(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=32, patch_size=8,
      num_channels=1, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_num_attention_heads=2,
      decoder_intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
  model = transformers.ViTMAEForPreTraining(config).eval()
  with torch.no_grad():  # norms and biases off their initial values; weights where GELU bends
    for name, p in model.named_parameters():
      if "layernorm" in name or name.endswith("bias") or "cls_token" in name:
        p.add_(0.1 * torch.randn_like(p))
      elif "encoder.layer" in name:
        p.mul_(10.0)
  model.save_pretrained(root / "vit_mae", safe_serialization=True)
  run = import_folder("vit_mae", root / "vit_mae", root / "run", max_len=0)
  return model, run


def test_an_imported_vit_mae_encoder_gives_its_hidden_states(vit):
  model, run = vit
  config, _, setup, params, _ = open_run(run)
  assert config.model.cls_token and list(config.data.imaging.patch_size) == [8, 8]
  assert json.loads((run / "imported.json").read_text())["not_imported"] == ["the MAE decoder"]
  images = np.random.default_rng(0).standard_normal((3, 32, 32, 1)).astype(np.float32)
  ours = setup.model.apply({"params": params}, {"imaging": {B.IMAGE: images}}, train=False)["imaging"]
  model.config.mask_ratio = 0.0  # every patch, in order (noise = their order)
  with torch.no_grad():
    theirs = model.vit(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                       noise=torch.arange(16, dtype=torch.float32).repeat(3, 1)).last_hidden_state.numpy()
  hidden = np.asarray(ours["hidden"])
  assert hidden.shape == theirs.shape == (3, 17, 32)  # CLS + 16 patches
  np.testing.assert_allclose(hidden, theirs, atol=1e-4, rtol=0)
  assert theirs.std() > 0.1
  np.testing.assert_allclose(np.asarray(ours["embedding"]), theirs[:, 1:].mean(1), atol=1e-4)  # RETFound's global pool


def test_an_imported_vit_mae_fine_tunes_on_an_image_label(vit, tmp_path):
  _, run = vit
  from biofm_jax.train.finetune import finetune, finetune_config
  config = finetune_config(load_config(f"{helpers.REPO / 'configs/finetune.py'}:binary,tiny", {
      **helpers.QUIET, "task.label_column": "lesion", "train.num_steps": 4, "train.eval_every": 4,
      "checkpoint.every_steps": 4, "finetune.mode": "frozen"}), run)
  summary = finetune(config, tmp_path / "ft")
  assert summary["steps"] == 4 and np.isfinite(summary["eval/task_loss"])
  # Frozen: the encoder is the imported one exactly (fine-tuning builds no MAE decoder).
  backbone = dict(jax.tree_util.tree_leaves_with_path(open_run(tmp_path / "ft")[3]["backbone"]))
  imported = dict(jax.tree_util.tree_leaves_with_path(open_run(run)[3]))
  assert backbone and set(backbone) <= set(imported)
  assert any("cls_token" in jax.tree_util.keystr(path) for path in backbone)
  for path, value in backbone.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(imported[path]), err_msg=jax.tree_util.keystr(path))


def test_an_imported_vit_mae_continues_mae_pre_training_with_a_new_decoder(vit, tmp_path):
  """The CLS token rides along the visible patches; the decoder sees the patches only."""
  from biofm_jax.train.loop import train_and_evaluate
  from biofm_jax.train.runs import with_init_run_model
  _, run = vit
  config = with_init_run_model(helpers.config_for(
      "configs/imaging_mae.py:tiny", train__init_from=str(run), train__num_steps=3, train__eval_every=3,
      train__log_every=1, checkpoint__every_steps=3, data__batch_size=8))
  assert config.model.cls_token and config.model.decoder.embed_dim == 16  # the imported run's
  summary = train_and_evaluate(config, tmp_path / "continued")
  assert np.isfinite(summary["train/loss"]) and np.isfinite(summary["eval/loss"])
  continued = dict(jax.tree_util.tree_leaves_with_path(open_run(tmp_path / "continued")[3]))
  assert any("cls_token" in jax.tree_util.keystr(path) for path in continued)


def _encoder_tensors(folder) -> dict:
  from safetensors.numpy import load_file
  return load_file(str(folder / "model.safetensors"))


def _hidden_states_of(published, images: np.ndarray) -> np.ndarray:
  """transformers' ViTMAEModel loaded from `published`: every patch in order (mask ratio 0,
  noise = the patches' order), CLS first."""
  model = transformers.ViTMAEModel.from_pretrained(published, mask_ratio=0.0).eval()
  num_patches = model.config.image_size ** 2 // model.config.patch_size ** 2
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                 noise=torch.arange(num_patches, dtype=torch.float32).repeat(len(images), 1)).last_hidden_state.numpy()


def test_an_imported_vit_mae_publishes_back_as_vit_mae_model(vit, tmp_path):
  """Import then publish gives ViT-MAE's encoder tensors back, and transformers' ViTMAEModel
  loaded from the published folder computes the original encoder's hidden states."""
  from biofm_jax.weights.publish import publish_run
  model, run = vit
  published = publish_run(run, tmp_path / "hf")
  assert json.loads((published / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
  original = {k[len("vit."):]: v for k, v in _encoder_tensors(run.parent / "vit_mae").items() if k.startswith("vit.")}
  again = _encoder_tensors(published)
  assert set(again) == set(original)
  for name, value in original.items():
    np.testing.assert_array_equal(again[name], value, err_msg=name)
  images = np.random.default_rng(1).standard_normal((2, 32, 32, 1)).astype(np.float32)
  model.config.mask_ratio = 0.0
  with torch.no_grad():
    theirs = model.vit(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2)),
                       noise=torch.arange(16, dtype=torch.float32).repeat(2, 1)).last_hidden_state.numpy()
  np.testing.assert_allclose(_hidden_states_of(published, images), theirs, atol=1e-5, rtol=0)


def test_a_vit_shaped_run_with_fixed_positions_publishes_and_others_are_refused_by_option(tmp_path):
  """An imaging MAE of ViT-MAE's architecture with our fixed sin-cos positions publishes (the
  table it adds is written as the position table); today's imaging default, which differs,
  is refused naming each option."""
  from biofm_jax.weights.publish import differences, publish_run, publisher_for
  from biofm_jax.weights.run_folder import write_run_folder
  vit_shape = dict(model__cls_token=True, model__bias=True, model__activation="gelu", model__norm="layernorm",
                   model__final_norm=True, model__norm_eps=1e-6, model__position="sincos")
  config = helpers.config_for("configs/imaging_mae.py:tiny", **vit_shape)
  run = write_run_folder(config, {}, tmp_path / "run", {}, fresh=((),))  # at initialisation, as pre-trained here
  published = publish_run(run, tmp_path / "hf")
  config, _, setup, params, _ = open_run(run)
  size = config.data.imaging.image_size[0]
  images = np.random.default_rng(2).standard_normal((2, size, size, config.data.imaging.channels)).astype(np.float32)
  ours = np.asarray(setup.model.apply({"params": params}, {"imaging": {B.IMAGE: images}}, train=False)["imaging"]["hidden"])
  theirs = _hidden_states_of(published, images)
  assert theirs.shape == ours.shape and theirs.std() > 0.1
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)

  default = helpers.config_for("configs/imaging_mae.py:tiny")
  problems = "; ".join(differences(default, publisher_for(default)))
  for expected in ("model.cls_token=False: ViTMAEModel computes True", "model.bias=False"):
    assert expected in problems
  volume = helpers.config_for("configs/imaging_mae3d.py:tiny", **vit_shape)
  assert "ViTMAEModel reads 2-D images" in "; ".join(differences(volume, publisher_for(volume)))
