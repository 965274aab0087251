"""ALTA's architecture (configs/alta.py) and checkpoints (convert.load_alta) against the PyTorch twin of ALTA."""

import json
import math
import pathlib
import re

import numpy as np
import pytest

import jax

from flax import traverse_util

from clinvla_jax import api, convert
from clinvla_jax.config import load_config
from clinvla_jax.convert import alta as alta_convert
from clinvla_jax.model import vit

torch = pytest.importorskip("torch")
from benchmarks import torch_clinvla  # noqa: E402

# ALTA's architecture at test size: the usual model.* overrides on configs/alta.py.
TINY = {
  "model.image.num_layers": 2,
  "model.image.hidden_size": 64,
  "model.image.num_heads": 4,
  "model.image.mlp_dim": 128,
  "model.image.adapter_dim": 16,
  "model.text.num_layers": 2,
  "model.text.hidden_size": 64,
  "model.text.num_heads": 4,
  "model.text.mlp_dim": 128,
  "model.text.adapter_dim": 16,
  "model.text.vocab_size": 120,
  "model.text.max_len": 40,
  "model.proj_dim": 32,
  "model.precision": "float32",
}
MEAN, STD = 0.4785, 0.2834
# Every tensor of ALTA's published ALTA.pth with its shape, read from ALTA's model code (github DopamineLcy/ALTA).
PUBLISHED_KEYS = pathlib.Path(__file__).parent / "data" / "alta_published_keys.json"


def test_position_tables_follow_their_formulas():
  # dim 8: two frequencies per axis; MAE's are 1/10000^(i/2) = (1, 0.01), MRM's 1/10000^(i/8) = (1, 10^-0.5).
  for frequencies, omega in (("mae", (1.0, 0.01)), ("mrm", (1.0, 10**-0.5))):
    table = vit.sincos_2d_position_embedding(2, 8, frequencies)
    assert table.shape == (5, 8)
    np.testing.assert_array_equal(table[0], np.zeros(8))  # CLS row
    # Patch 1 = row 0, column 1: the first half encodes the column, the second the row.
    col = [math.sin(omega[0]), math.sin(omega[1]), math.cos(omega[0]), math.cos(omega[1])]
    np.testing.assert_allclose(table[2], col + [0.0, 0.0, 1.0, 1.0], atol=1e-7)
    # Patch 2 = row 1, column 0.
    np.testing.assert_allclose(table[3], [0.0, 0.0, 1.0, 1.0] + col, atol=1e-7)
  # At ViT-B/16 size the two tables differ by about 2 (the bug a wrong table causes).
  diff = np.abs(vit.fixed_position_table("sincos", 14, 768) - vit.fixed_position_table("sincos_mrm", 14, 768))
  assert 1.5 < diff.max() <= 2.0


def test_twin_position_table_equals_ours():
  # Two independent writings of MRM's table (the twin follows ALTA's description).
  np.testing.assert_allclose(
    torch_clinvla.alta_position_table(768, 14), vit.fixed_position_table("sincos_mrm", 14, 768), atol=1e-5
  )


def test_config_defaults_keep_clinvla():
  base = api.model_config(load_config("configs/base.py"))
  assert (base.image.adapter_style, base.text.adapter_style, base.head_style) == ("clinvla", "madx", "clinvla")
  assert (base.image.pos_embed, base.image.missing_view_token, base.missing_view_pooling) == (
    "sincos",
    "shared",
    "valid",
  )
  alta = api.model_config(load_config("configs/alta.py"))
  assert (alta.image.hidden_size, alta.image.num_layers, alta.text.hidden_size, alta.text.vocab_size) == (
    768,
    12,
    768,
    30522,
  )
  assert (alta.image.adapter_dim, alta.text.adapter_dim, alta.proj_dim) == (192, 192, 128)
  assert not alta.text.invertible_adapter and alta.learn_local_temperatures


@pytest.fixture(scope="module")
def tiny_cfg():
  return load_config("configs/alta.py", TINY)


def twin_sizes(cfg) -> torch_clinvla.AltaSizes:
  """The twin's sizes for a config's model (decoder and MLM head small: inference never reads them)."""
  m = api.model_config(cfg)
  return torch_clinvla.AltaSizes(
    image_layers=m.image.num_layers,
    image_hidden=m.image.hidden_size,
    image_heads=m.image.num_heads,
    image_mlp_dim=m.image.mlp_dim,
    image_adapter_dim=m.image.adapter_dim,
    text_layers=m.text.num_layers,
    text_hidden=m.text.hidden_size,
    text_heads=m.text.num_heads,
    text_intermediate=m.text.mlp_dim,
    text_adapter_dim=m.text.adapter_dim,
    vocab_size=m.text.vocab_size,
    max_position_embeddings=m.text.max_len + 24,  # longer than the model's: the loader keeps the first rows
    proj_dim=m.proj_dim,
    decoder_embed_dim=32,
    decoder_depth=1,
    decoder_num_heads=2,
  )


@pytest.fixture(scope="module")
def twin(tiny_cfg):
  model = torch_clinvla.TorchALTA(twin_sizes(tiny_cfg))
  model.randomize_(seed=0)
  return model.eval()


@pytest.fixture(scope="module")
def loaded(tiny_cfg, twin):
  variables = api.init_params(tiny_cfg, jax.random.key(1))
  return convert.load_alta(variables, twin.state_dict(), config=tiny_cfg)


def _images(batch, views, seed=0):
  rng = np.random.RandomState(seed)
  return rng.randint(0, 256, (batch, views, 224, 224)).astype(np.uint8)


def _torch_pixels(images_u8):
  x = (images_u8.astype(np.float32) / 255.0 - MEAN) / STD
  return torch.from_numpy(np.repeat(x[..., None, :, :], 3, axis=-3))


def test_frontal_embedding_equals_twin(tiny_cfg, twin, loaded):
  images = _images(3, 1)
  ours = api.encode_images(tiny_cfg, loaded, images)
  with torch.no_grad():
    theirs = twin.forward_img_feature(_torch_pixels(images)[:, 0]).numpy()
  np.testing.assert_allclose(np.asarray(ours["global"]), theirs, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(ours["global"]), axis=-1), 1.0, atol=1e-5)


def test_masked_four_view_study_with_a_missing_view_equals_twin(tiny_cfg, twin, loaded):
  batch, kept = 2, 49
  images = _images(batch, 4, seed=1)
  valid = np.array([[True, True, True, False], [True, False, True, True]])
  images[~valid] = 0
  rng = np.random.RandomState(2)
  ids_keep = np.stack([np.stack([np.sort(rng.permutation(196)[:kept]) for _ in range(4)]) for _ in range(batch)])
  patches, _ = api.patchify(images, 16)
  patches = np.take_along_axis(np.asarray(patches), ids_keep[..., None], axis=2)
  ours = api.encode_images(tiny_cfg, loaded, patches, view_valid=valid, patch_idx=ids_keep)
  pixels = _torch_pixels(images)
  pixels[torch.from_numpy(~valid)] = 0.0  # ALTA marks a missing view by an all-zero image
  with torch.no_grad():
    theirs = twin.encode_views(pixels, torch.from_numpy(ids_keep).long())
  np.testing.assert_allclose(np.asarray(ours["global"]), theirs["global"].numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours["local"]), theirs["local"].numpy(), atol=1e-5)
  assert np.asarray(ours["local_mask"]).all()  # ALTA aligns every view's patches


def test_text_embeddings_equal_twin(tiny_cfg, twin, loaded):
  rng = np.random.RandomState(3)
  ids = rng.randint(5, 120, (3, 24)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 15:] = 0
  mask[2, 6:] = 0
  ids[mask == 0] = 0
  ours = api.encode_text(tiny_cfg, loaded, ids, mask)
  with torch.no_grad():
    theirs = twin.encode_text(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
    single = twin.forward_txt_feature_single(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
  np.testing.assert_allclose(np.asarray(ours["global"]), single.numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours["global"]), theirs["global"].numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours["hidden"]), theirs["hidden"].numpy(), atol=1e-5)
  np.testing.assert_allclose(np.asarray(ours["local"])[:, 1:], theirs["local"].numpy(), atol=1e-5)


def test_scalars_and_embeddings_land_where_alta_keeps_them(twin, loaded):
  state = {k: v.detach().float().numpy() for k, v in twin.state_dict().items()}
  params = loaded["params"]
  np.testing.assert_allclose(float(params["logit_scale"]), state["logit_scale"], rtol=1e-7)
  np.testing.assert_allclose(
    np.asarray(params["local_log_temperatures"]),
    [state[f"logit_scale_local{i}"] for i in (1, 2, 3)],
    rtol=1e-7,
  )
  np.testing.assert_array_equal(params["image_tower"]["missing_token"], state["missing_token"][0])
  np.testing.assert_array_equal(params["image_tower"]["time_embed"], state["temporal_embedding"][0])


@pytest.mark.slow
def test_scan_layout_loads_the_same_weights(twin, loaded):
  cfg = load_config("configs/alta.py", {**TINY, "model.image.scan_layers": True, "model.text.scan_layers": True})
  scanned = convert.load_alta(api.init_params(cfg, jax.random.key(4)), twin.state_dict(), config=cfg)
  back = convert.unstack_layers(scanned["params"])
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(loaded["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_files_with_and_without_the_model_wrapper_load_alike(tiny_cfg, twin, loaded, tmp_path):
  from safetensors.numpy import save_file

  state = twin.state_dict()
  torch.save({"model": state, "epoch": 10}, tmp_path / "ALTA.pth")
  save_file({k: v.detach().numpy().copy() for k, v in state.items()}, tmp_path / "ALTA.safetensors")
  for source in (tmp_path / "ALTA.pth", tmp_path / "ALTA.safetensors"):
    again = convert.load_alta(api.init_params(tiny_cfg, jax.random.key(5)), str(source))
    for a, b in zip(jax.tree_util.tree_leaves(again), jax.tree_util.tree_leaves(loaded)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unknown_missing_and_misshapen_keys_are_named(tiny_cfg, twin):
  variables = api.init_params(tiny_cfg, jax.random.key(1))
  state = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
  broken = dict(state)
  broken["blocks.0.extra_adapter.weight"] = np.zeros(3, np.float32)
  del broken["bert_encoder.bert.encoder.layer.1.mlp_adapter.D_fc2.bias"]
  broken["view_embedding"] = np.zeros((1, 3, 64), np.float32)
  with pytest.raises(convert.CheckpointError) as error:
    convert.load_alta(variables, broken)
  message = str(error.value)
  assert "blocks.0.extra_adapter.weight" in message
  assert "bert_encoder.bert.encoder.layer.1.mlp_adapter.D_fc2.bias" in message
  assert "view_embedding (1, 3, 64)" in message


def test_a_clinvla_model_is_told_which_switches_to_set(twin, placeholder_params):
  cfg = load_config("configs/tiny.py")
  with pytest.raises(convert.CheckpointError, match="adapter_style='alta'") as error:
    convert.load_alta(placeholder_params(cfg), twin.state_dict())
  assert "head_style='alta'" in str(error.value) and "invertible_adapter=False" in str(error.value)


def test_position_table_must_match_or_be_learned(twin, placeholder_params):
  state = {k: v.detach().numpy() for k, v in twin.state_dict().items()}
  mae_cfg = load_config("configs/alta.py", {**TINY, "model.image.pos_embed": "sincos"})
  with pytest.raises(convert.CheckpointError, match="'sincos_mrm' table.*pos_embed='sincos'"):
    convert.load_alta(placeholder_params(mae_cfg), state, config=mae_cfg)
  # A table of no fixed formula needs the learned (parameter) table, which then holds it exactly.
  state["pos_embed"] = state["pos_embed"] + 0.5
  with pytest.raises(convert.CheckpointError, match="pos_embed='learned'"):
    convert.load_alta(placeholder_params(load_config("configs/alta.py", TINY)), state)
  learned_cfg = load_config("configs/alta.py", {**TINY, "model.image.pos_embed": "learned"})
  loaded = convert.load_alta(placeholder_params(learned_cfg), state, config=learned_cfg)
  np.testing.assert_array_equal(loaded["params"]["image_tower"]["pos_embedding"], state["pos_embed"][0])
  state["pos_embed"] = state["pos_embed"][:, :50]
  with pytest.raises(convert.CheckpointError, match="does not fit.*grid 7"):
    convert.load_alta(placeholder_params(learned_cfg), state, config=learned_cfg)


def test_mrm_table_in_a_vit_checkpoint_names_the_setting(placeholder_params):
  cfg = load_config("configs/tiny.py")
  state = {"pos_embed": vit.fixed_position_table("sincos_mrm", 14, 64)[None]}
  with pytest.raises(convert.CheckpointError, match="pos_embed='sincos_mrm'"):
    convert.load_image_weights(placeholder_params(cfg), state, config=cfg)


def test_every_published_key_is_mapped_or_skipped():
  """ALTA's published checkpoint (ViT-B/16 + CXR-BERT-specialized), every tensor by name and shape, against
  configs/alta.py: mapped, checked (the fixed position table) or on the skip list."""
  with open(PUBLISHED_KEYS) as f:
    published = {name: tuple(shape) for name, shape in json.load(f).items()}
  cfg = load_config("configs/alta.py")
  params = jax.eval_shape(lambda: api.init_params(cfg, jax.random.key(0)))["params"]
  plan = alta_convert.build_plan(params, published)
  planned = {key for key, _ in plan.values()}
  skipped = {k for k in published if any(re.fullmatch(p, k) for p in alta_convert.PRETRAINING_ONLY)}
  checked = {"pos_embed"}
  local_scales = set(alta_convert.LOCAL_SCALES)  # loaded stacked, as one parameter
  assert sorted(set(published) - planned - skipped - checked - local_scales) == []
  assert planned - set(published) == {alta_convert.STACKED_LOCAL_SCALES}
  assert {k.split(".")[0] for k in skipped} == {
    "decoder_embed",
    "mask_token",
    "decoder_pos_embed",
    "decoder_blocks",
    "decoder_norm",
    "decoder_pred",
    "bert_embed",
    "bert_encoder",
  }
  flat = traverse_util.flatten_dict(params)
  for ours, (key, transform) in plan.items():
    if key == alta_convert.STACKED_LOCAL_SCALES:
      continue
    value = transform(np.zeros(published[key], np.float32))
    if key == alta_convert.TEXT_BACKBONE_PREFIX + "embeddings.position_embeddings.weight":
      value = convert.hf_bert.keep_first_positions(value, flat[ours].shape)
    assert tuple(value.shape) == tuple(flat[ours].shape), (key, ours)


def test_init_alta_weights_start_evaluation_and_training(tiny_cfg, twin, loaded, tmp_path):
  from clinvla_jax import optim, sharding, train, weights

  torch.save({"model": twin.state_dict()}, tmp_path / "ALTA.pth")
  cfg = load_config("configs/alta.py", {**TINY, "init.alta_weights": str(tmp_path / "ALTA.pth")})
  expected = traverse_util.flatten_dict(loaded["params"])
  # --mode=eval / embed / index start from weights.initial_variables (via evaluation_variables).
  for path, value in traverse_util.flatten_dict(weights.initial_variables(cfg)["params"]).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]), err_msg="/".join(path))
  # Training starts from the same weights, split into trainable and frozen by ALTA's rules.
  setup = train.TrainSetup(cfg, mesh=sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  merged = traverse_util.flatten_dict(optim.merge_params(setup.trainable_init, setup.frozen_params))
  assert merged.keys() == expected.keys()
  for path, value in merged.items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(expected[path]), err_msg="/".join(path))
  trainable = optim.flat_paths(setup.trainable_init)
  assert "image_tower/blocks_0/attn_adapter/up/kernel" in trainable and "logit_scale" in trainable
  assert "image_tower/missing_token" not in trainable  # ALTA keeps its missing token frozen
