"""Our towers against their PyTorch peers, with the same weights moved by our converters."""

import numpy as np
import pytest

import torch

import jax

from clinvla_jax import api, convert
from clinvla_jax.config import load_config
from clinvla_jax.model.vit import sincos_2d_position_embedding


def _minilm_overrides(adapters: bool, scan_layers: bool = False):
  return {
    "model.text.scan_layers": scan_layers,
    "model.text.num_layers": 6,
    "model.text.hidden_size": 384,
    "model.text.num_heads": 12,
    "model.text.mlp_dim": 1536,
    "model.text.vocab_size": 30522,
    "model.text.max_len": 128,
    "model.text.use_adapters": adapters,
    "model.text.invertible_adapter": adapters,
    "model.text.dropout": 0.0,
    "model.text.attention_dropout": 0.0,
  }


@pytest.fixture(scope="module")
def hf_minilm(minilm_dir):
  import transformers

  model = transformers.BertModel.from_pretrained(
    str(minilm_dir), local_files_only=True, attn_implementation="eager"
  ).eval()
  tokenizer = transformers.BertTokenizerFast.from_pretrained(str(minilm_dir), local_files_only=True)
  return model, tokenizer


@pytest.fixture(scope="module")
def minilm_batch(hf_minilm, report_sentences):
  _, tokenizer = hf_minilm
  enc = tokenizer(report_sentences[:6], padding="max_length", truncation=True, max_length=128, return_tensors="np")
  assert enc["attention_mask"].sum(1).min() > 3 and enc["attention_mask"].sum(1).max() < 128
  return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _hf_hidden(hf_model, ids, mask):
  with torch.no_grad():
    out = hf_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
  return out.last_hidden_state.numpy()


# Both block layouts (a Python loop of blocks, one nn.scan over stacked blocks) against the same peer.
# The loop layout in the default tier; the scan layout (the same peer, the other block layout) in the full tier.
LAYOUTS = pytest.mark.parametrize(
  "scan_layers", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["loop", "scan"]
)


@LAYOUTS
def test_bert_matches_transformers_on_real_weights(
  hf_minilm, minilm_batch, minilm_dir, scan_layers, placeholder_params
):
  hf_model, _ = hf_minilm
  ids, mask = minilm_batch
  cfg = load_config("configs/tiny.py", _minilm_overrides(adapters=False, scan_layers=scan_layers))
  # Every weight the text tower's hidden states read comes from the checkpoint.
  variables = convert.load_text_weights(placeholder_params(cfg), minilm_dir)
  ours = np.asarray(api.encode_text(cfg, variables, ids, mask)["hidden"])
  theirs = _hf_hidden(hf_model, ids, mask)
  valid = mask.astype(bool)
  diff = np.abs(ours - theirs)[valid].max()
  assert diff <= 1e-4, diff
  # Sanity: the comparison is not vacuous (real activations of size O(1)).
  assert np.abs(theirs[valid]).mean() > 0.05


# The full tier (both layouts): a MiniLM-sized adapted tower to initialise and compile; the default tier's
# identity-adapter checks are test_model.py's on the tiny towers.
@pytest.mark.slow
@LAYOUTS
def test_identity_adapters_leave_bert_unchanged(minilm_batch, minilm_dir, scan_layers, placeholder_params):
  ids, mask = minilm_batch
  plain_cfg = load_config("configs/tiny.py", _minilm_overrides(adapters=False, scan_layers=scan_layers))
  adapted_cfg = load_config("configs/tiny.py", _minilm_overrides(adapters=True, scan_layers=scan_layers))
  # The plain tower is the checkpoint alone; the adapted one keeps its initial (identity) adapters.
  plain = convert.load_text_weights(placeholder_params(plain_cfg), minilm_dir)
  adapted = convert.load_text_weights(api.init_params(adapted_cfg, jax.random.key(1)), minilm_dir)
  a = np.asarray(api.encode_text(plain_cfg, plain, ids, mask)["hidden"])
  b = np.asarray(api.encode_text(adapted_cfg, adapted, ids, mask)["hidden"])
  np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_bert_adapters_with_bert_init_change_outputs(minilm_batch, minilm_dir):
  ids, mask = minilm_batch
  overrides = dict(_minilm_overrides(adapters=True), **{"model.text.adapter_init": "bert"})
  cfg = load_config("configs/tiny.py", overrides)
  variables = convert.load_text_weights(api.init_params(cfg, jax.random.key(0)), minilm_dir)
  plain_cfg = load_config("configs/tiny.py", _minilm_overrides(adapters=False))
  plain = convert.load_text_weights(api.init_params(plain_cfg, jax.random.key(0)), minilm_dir)
  a = np.asarray(api.encode_text(cfg, variables, ids, mask)["hidden"])
  b = np.asarray(api.encode_text(plain_cfg, plain, ids, mask)["hidden"])
  assert np.abs(a - b).max() > 1e-3


VIT_OVERRIDES = {
  "model.image.num_layers": 2,
  "model.image.hidden_size": 192,
  "model.image.num_heads": 3,
  "model.image.mlp_dim": 768,
  "model.image.adapter_dim": 0,
}


def _timm_vit(seed=0):
  import timm

  torch.manual_seed(seed)
  model = timm.models.vision_transformer.VisionTransformer(
    img_size=224,
    patch_size=16,
    in_chans=3,
    num_classes=0,
    embed_dim=192,
    depth=2,
    num_heads=3,
    mlp_ratio=4.0,
    qkv_bias=True,
    class_token=True,
    global_pool="token",
  ).eval()
  # Random (not default-initialised) LayerNorms and biases, so every weight is exercised.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
    model.cls_token.normal_(0, 0.5)
    model.pos_embed.copy_(torch.from_numpy(sincos_2d_position_embedding(14, 192))[None])
  return model


@LAYOUTS
def test_vit_matches_timm_with_random_weights(scan_layers, placeholder_params):
  model = _timm_vit()
  cfg = load_config("configs/tiny.py", dict(VIT_OVERRIDES, **{"model.image.scan_layers": scan_layers}))
  # The checkpoint's weights; the view and time embeddings (random here) are zeroed below.
  variables = convert.load_image_weights(placeholder_params(cfg), model.state_dict())
  rng = np.random.RandomState(0)
  images = rng.normal(size=(2, 3, 224, 224)).astype(np.float32)
  with torch.no_grad():
    theirs = model.forward_features(torch.from_numpy(images)).numpy()  # [B, 197, D]
  patches, idx = api.patchify(np.transpose(images, (0, 2, 3, 1))[:, None], 16)  # [B, 1, 196, 768]
  out = api.encode_images(
    cfg,
    variables,
    np.asarray(patches),
    view_valid=np.ones((2, 1), bool),
    patch_idx=np.broadcast_to(np.asarray(idx), (2, 1, 196)),
  )
  hidden = np.asarray(out["hidden"])[:, 0]
  # timm has no view / time embeddings: compare with them zeroed.
  assert hidden.shape == theirs.shape
  zeroed = _zero_view_time(variables)
  hidden = np.asarray(
    api.encode_images(
      cfg,
      zeroed,
      np.asarray(patches),
      view_valid=np.ones((2, 1), bool),
      patch_idx=np.broadcast_to(np.asarray(idx), (2, 1, 196)),
    )["hidden"]
  )[:, 0]
  diff = np.abs(hidden - theirs).max()
  assert diff <= 1e-4, diff
  assert np.abs(theirs).mean() > 0.05


def _zero_view_time(variables):
  params = jax.tree_util.tree_map(lambda x: x, variables["params"])
  tower = dict(params["image_tower"])
  tower["view_embed"] = np.zeros_like(tower["view_embed"])
  tower["time_embed"] = np.zeros_like(tower["time_embed"])
  params = dict(params, image_tower=tower)
  return {**variables, "params": params}


def test_grayscale_patches_equal_replicated_channels():
  cfg = load_config("configs/tiny.py", VIT_OVERRIDES)
  variables = api.init_params(cfg, jax.random.key(3))
  gray = np.random.RandomState(1).randint(0, 256, size=(2, 1, 224, 224)).astype(np.uint8)
  rgb = np.repeat(gray[..., None], 3, axis=-1)
  a = np.asarray(api.encode_images(cfg, variables, gray)["hidden"])
  b = np.asarray(api.encode_images(cfg, variables, rgb)["hidden"])
  np.testing.assert_allclose(a, b, atol=2e-5)
