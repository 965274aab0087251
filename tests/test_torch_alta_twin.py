"""The PyTorch ALTA twin (benchmarks.torch_clinvla.TorchALTA) on its own: names, shapes, semantics.

Its standard parts are checked against timm's ViT Block and transformers' BERT
with ALTA's adapters hooked in; the rest against relations that ALTA's design
implies (views never attend to each other, a missing view only changes itself,
kept-patch selection commutes with attention).
"""

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from benchmarks import torch_clinvla as tc

TINY = tc.ALTA_TINY_SIZES
ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
  torch.manual_seed(0)
  return tc.TorchALTA(**TINY, seed=0).eval()


def _images(batch, seed=1):
  gen = torch.Generator().manual_seed(seed)
  size = TINY["image_size"]
  return torch.randn(batch, 4, 3, size, size, generator=gen)


def _text(batch, length=10, seed=2):
  gen = torch.Generator().manual_seed(seed)
  ids = torch.randint(1, TINY["vocab_size"], (batch, length), generator=gen)
  mask = torch.ones(batch, length, dtype=torch.long)
  mask[1, 6:] = 0
  ids[1, 6:] = 0
  return ids, mask


# ---------------------------------------------------------------- names and shapes


def test_tiny_state_dict_is_alta_key_names_in_order(model):
  state = model.state_dict()
  expected = tc.alta_key_names(**TINY)
  assert list(state) == list(expected)
  assert {k: tuple(v.shape) for k, v in state.items()} == expected
  assert state["missing_token"].dtype == torch.float16
  assert all(v.dtype == torch.float32 for k, v in state.items() if k != "missing_token")
  assert not list(model.buffers())


def test_published_names_and_shapes():
  names = tc.alta_key_names()
  # 11 own tensors, patch embed 2, 12 blocks x 20, norm / bert_embed / decoder_embed 6,
  # 4 decoder blocks x 12, decoder norm / pred 4, two heads x 6; text: embeddings 5,
  # 12 layers x 24, MLM head 7, two heads x 6.
  assert len(names) == 11 + 2 + 240 + 6 + 48 + 4 + 12 + 5 + 288 + 7 + 12 == 635
  pinned = {
    "cls_token": (1, 1, 768),
    "missing_token": (1, 196, 768),
    "pos_embed": (1, 197, 768),
    "decoder_pos_embed": (1, 197, 768),
    "mask_token": (1, 1, 768),
    "logit_scale_local3": (),
    "patch_embed.proj.weight": (768, 3, 16, 16),
    "blocks.11.attn.qkv.weight": (2304, 768),
    "blocks.0.attn_adapter.D_fc1.weight": (192, 768),
    "blocks.0.mlp_adapter.D_fc2.weight": (768, 192),
    "decoder_blocks.3.mlp.fc1.weight": (3072, 768),
    "decoder_pred.weight": (3072, 768),  # (2 * 16) ** 2 * 3 outputs
    "bert_embed.weight": (768, 768),
    "projection_head.dense_to_hidden.weight": (128, 768),
    "local_projection_head.dense_to_output.weight": (128, 128),
    "bert_encoder.bert.embeddings.word_embeddings.weight": (30522, 768),
    "bert_encoder.bert.embeddings.position_embeddings.weight": (512, 768),
    "bert_encoder.bert.encoder.layer.11.mlp_adapter.D_fc1.weight": (192, 768),
    "bert_encoder.bert.encoder.layer.0.intermediate.dense.weight": (3072, 768),
    "bert_encoder.cls.predictions.bias": (30522,),
    "bert_encoder.cls.predictions.decoder.weight": (30522, 768),
    "bert_encoder.cls.predictions.decoder.bias": (30522,),
    "bert_encoder.cls_projection_head.LayerNorm.weight": (128,),
  }
  assert {k: names[k] for k in pinned} == pinned
  assert not [k for k in names if "pooler" in k or "position_ids" in k or "token_type_ids" in k]
  assert "decoder_blocks.0.attn_adapter.D_fc1.weight" not in names

  with torch.device("meta"):
    big = tc.TorchALTA()
  assert {k: tuple(v.shape) for k, v in big.state_dict().items()} == names
  assert list(big.state_dict()) == list(names)


def _bert_config(s, **extra):
  import transformers

  return transformers.BertConfig(
    vocab_size=s.vocab_size,
    hidden_size=s.text_hidden,
    num_hidden_layers=s.text_layers,
    num_attention_heads=s.text_heads,
    intermediate_size=s.text_intermediate,
    max_position_embeddings=s.max_position_embeddings,
    **extra,
  )


def test_bert_names_are_transformers_masked_lm(model):
  import transformers

  config = _bert_config(model.sizes)
  theirs = {k: tuple(v.shape) for k, v in transformers.BertForMaskedLM(config).state_dict().items()}
  ours = {
    k: tuple(v.shape)
    for k, v in model.bert_encoder.state_dict().items()
    if "adapter" not in k and "projection_head" not in k
  }
  assert list(ours) == list(theirs) and ours == theirs
  predictions = model.bert_encoder.cls.predictions
  assert predictions.decoder.bias is predictions.bias
  assert predictions.decoder.weight is model.bert_encoder.bert.embeddings.word_embeddings.weight


# ---------------------------------------------------------------- the sin-cos table


def test_position_table_formula():
  table = tc.alta_position_table(8, 3)
  assert table.shape == (10, 8) and table.dtype == np.float32
  np.testing.assert_array_equal(table[0], np.zeros(8))
  # Patch 5 is row 1, column 2; frequencies 1 and 10000**(-1/8).
  expected = [
    0.9092974268,
    0.5911271172,
    -0.4161468365,
    0.8065784099,
    0.8414709848,
    0.3109835929,
    0.5403023059,
    0.9504152803,
  ]
  np.testing.assert_allclose(table[6], expected, atol=1e-7)

  big = tc.alta_position_table(768, 14)
  assert big.shape == (197, 768)
  # Last patch (13, 13): channel 191 is sin(13 w_191), 383 its cos; patch (5, 0): channel 384 + 100 is sin(5 w_100).
  np.testing.assert_allclose(big[196, [191, 383]], [0.9676350263, 0.2523538308], atol=1e-6)
  np.testing.assert_allclose(big[1 + 5 * 14, 484], 0.9979708820, atol=1e-6)


def test_position_table_is_the_jax_mrm_table():
  from clinvla_jax.model.vit import sincos_2d_position_embedding

  ours = tc.alta_position_table(64, 4)
  np.testing.assert_allclose(ours, sincos_2d_position_embedding(4, 64, frequencies="mrm"), atol=1e-6)
  assert np.abs(ours - sincos_2d_position_embedding(4, 64, frequencies="mae")).max() > 0.1


# ---------------------------------------------------------------- random values


def test_randomize_leaves_nothing_at_alta_init(model):
  state = model.state_dict()
  table = torch.from_numpy(tc.alta_position_table(TINY["image_hidden"], 4))[None]
  torch.testing.assert_close(state["pos_embed"], table, rtol=0, atol=0)
  for name, value in state.items():
    if "pos_embed" in name:
      continue
    value = value.float()
    assert value.abs().max() > 1e-2, name
    if value.numel() > 1:
      assert value.std() > 1e-3, name
  norm_weights = [v for k, v in state.items() if k.endswith("norm1.weight") or "LayerNorm.weight" in k]
  assert norm_weights and all((w - 1).abs().max() > 1e-2 for w in norm_weights)
  assert state["missing_token"].abs().max() > 0.1
  assert state["logit_scale"] != pytest.approx(math.log(1 / 0.07))
  again = tc.TorchALTA(**TINY, seed=0).state_dict()
  assert all(torch.equal(again[k], v) for k, v in state.items())
  other = tc.TorchALTA(**TINY, seed=1).state_dict()
  assert not torch.equal(other["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------- against timm and transformers


def _hook_alta_adapters_into_timm(block, attn_adapter, mlp_adapter):
  block.attn_adapter, block.mlp_adapter = attn_adapter, mlp_adapter
  block.attn.register_forward_hook(lambda _, __, out: block.attn_adapter(out))
  block.mlp.register_forward_hook(lambda _, inputs, out: out + 0.5 * block.mlp_adapter(inputs[0]))


def test_image_blocks_match_timm(model):
  from timm.models.vision_transformer import Block

  s = model.sizes
  x = torch.randn(3, 17, s.image_hidden, generator=torch.Generator().manual_seed(3))
  norm = functools.partial(nn.LayerNorm, eps=1e-6)
  ours = model.blocks[1]
  theirs = Block(s.image_hidden, s.image_heads, s.image_mlp_dim / s.image_hidden, qkv_bias=True, norm_layer=norm)
  _hook_alta_adapters_into_timm(theirs, ours.attn_adapter, ours.mlp_adapter)
  theirs.load_state_dict(ours.state_dict(), strict=True)
  with torch.no_grad():
    torch.testing.assert_close(ours(x), theirs.eval()(x), rtol=0, atol=ATOL)

  dec = model.decoder_blocks[0]
  y = torch.randn(2, 5, s.decoder_embed_dim, generator=torch.Generator().manual_seed(4))
  plain = Block(s.decoder_embed_dim, s.decoder_num_heads, 4.0, qkv_bias=True, norm_layer=norm)
  plain.load_state_dict(dec.state_dict(), strict=True)
  with torch.no_grad():
    torch.testing.assert_close(dec(y), plain.eval()(y), rtol=0, atol=ATOL)


def _hook_alta_adapters_into_bert(layer, attn_adapter, mlp_adapter):
  layer.attention.register_forward_hook(lambda _, __, out: (attn_adapter(out[0]),) + tuple(out[1:]))

  # transformers counts this function's parameters, so it takes exactly one.
  def feed_forward_chunk(attention_output):
    return layer.output(layer.intermediate(attention_output), attention_output) + 0.5 * mlp_adapter(attention_output)

  layer.feed_forward_chunk = feed_forward_chunk


def test_text_tower_matches_transformers_bert_with_adapters(model):
  import transformers

  config = _bert_config(model.sizes, attn_implementation="eager")
  bert = transformers.BertModel(config, add_pooling_layer=False).eval()
  ours = model.bert_encoder.bert
  weights = {k: v for k, v in ours.state_dict().items() if "adapter" not in k}
  bert.load_state_dict(weights, strict=True)
  for layer, mine in zip(bert.encoder.layer, ours.encoder.layer):
    _hook_alta_adapters_into_bert(layer, mine.attn_adapter, mine.mlp_adapter)
  ids, mask = _text(2)
  with torch.no_grad():
    got = model.encode_text(ids, mask)
    want = bert(input_ids=ids, attention_mask=mask).last_hidden_state
  keep = mask.bool()
  torch.testing.assert_close(got["hidden"][keep], want[keep], rtol=0, atol=ATOL)


# ---------------------------------------------------------------- image semantics


def test_views_do_not_attend_to_each_other(model):
  imgs = _images(2)
  with torch.no_grad():
    out = model.encode_views(imgs)
    single = model.forward_img_hidden(imgs[:, 0])
    feature = model.forward_img_feature(imgs[:, 0], 1)
    changed = imgs.clone()
    changed[:, 3] = torch.randn_like(changed[:, 3])
    out2 = model.encode_views(changed)
  # Slot 0 carries the same view / time embeddings as the single-image path.
  torch.testing.assert_close(out["hidden"][:, 0], single, rtol=0, atol=ATOL)
  torch.testing.assert_close(feature, F.normalize(model.projection_head(single[:, 0]), dim=-1), rtol=0, atol=ATOL)
  torch.testing.assert_close(out2["hidden"][:, :3], out["hidden"][:, :3], rtol=0, atol=0)
  assert (out2["hidden"][:, 3] - out["hidden"][:, 3]).abs().max() > 1e-3
  # Slots 1..3 differ from slot 0 only through their embeddings.
  same = imgs[:, :1].expand(-1, 4, -1, -1, -1)
  with torch.no_grad():
    hidden = model.encode_views(same)["hidden"]
  assert all((hidden[:, v] - hidden[:, 0]).abs().max() > 1e-3 for v in (1, 2, 3))
  torch.testing.assert_close(feature.norm(dim=-1), torch.ones(2), rtol=0, atol=1e-6)


def test_outputs_are_built_from_hidden(model):
  imgs = _images(2)
  with torch.no_grad():
    out = model.encode_views(imgs)
    hidden = out["hidden"]
    torch.testing.assert_close(out["cls"], hidden[:, :, 0], rtol=0, atol=0)
    pooled = model.projection_head(hidden[:, :, 0].mean(dim=1))
    torch.testing.assert_close(out["global"], F.normalize(pooled, dim=-1), rtol=0, atol=ATOL)
    n = hidden.shape[2] - 1
    for v in range(4):
      local = model.local_projection_head(hidden[:, v, 1:])
      torch.testing.assert_close(out["local"][:, v * n : (v + 1) * n], local, rtol=0, atol=ATOL)


def test_missing_view_changes_only_itself(model):
  imgs = _images(2)
  gone = imgs.clone()
  gone[:, 2] = 0
  with torch.no_grad():
    full = model.encode_views(imgs)
    part = model.encode_views(gone)
  for v in (0, 1, 3):
    torch.testing.assert_close(part["hidden"][:, v], full["hidden"][:, v], rtol=0, atol=0)
  assert (part["hidden"][:, 2] - full["hidden"][:, 2]).abs().max() > 1e-3
  # The missing view is the same for every study: only missing_token and slot 2's embeddings enter it.
  torch.testing.assert_close(part["hidden"][0, 2], part["hidden"][1, 2], rtol=0, atol=0)
  # ... namely this sequence; the mean over views still counts it.
  pos = model.pos_embed
  seq = torch.cat([model.cls_token + pos[:, :1], model.missing_token.float() + pos[:, 1:]], dim=1)
  seq = seq + model.view_embedding[:, 0:1] + model.temporal_embedding[:, 1:2]
  with torch.no_grad():
    expected = model._run_blocks(seq)[0]
    torch.testing.assert_close(part["hidden"][0, 2], expected, rtol=0, atol=ATOL)
    pooled = model.projection_head(part["hidden"][:, :, 0].mean(dim=1))
  torch.testing.assert_close(part["global"], F.normalize(pooled, dim=-1), rtol=0, atol=ATOL)


def test_ids_keep_selects_patches(model):
  imgs = _images(2)
  n = model.sizes.num_patches
  gen = torch.Generator().manual_seed(5)
  perm = torch.stack([torch.stack([torch.randperm(n, generator=gen) for _ in range(4)]) for _ in range(2)])
  with torch.no_grad():
    full = model.encode_views(imgs)
    shuffled = model.encode_views(imgs, perm)
    sub = model.encode_views(imgs, perm[:, :, :5])
  # Positions travel with the tokens, so a permutation only reorders them.
  torch.testing.assert_close(shuffled["hidden"][:, :, 0], full["hidden"][:, :, 0], rtol=0, atol=ATOL)
  gathered = torch.gather(full["hidden"][:, :, 1:], 2, perm[..., None].expand(-1, -1, -1, full["hidden"].shape[-1]))
  torch.testing.assert_close(shuffled["hidden"][:, :, 1:], gathered, rtol=0, atol=ATOL)
  assert sub["hidden"].shape == (2, 4, 6, TINY["image_hidden"])
  assert sub["local"].shape == (2, 20, TINY["proj_dim"])
  assert (sub["cls"] - full["cls"]).abs().max() > 1e-4


# ---------------------------------------------------------------- text semantics


def test_text_outputs(model):
  ids, mask = _text(2)
  with torch.no_grad():
    out = model.encode_text(ids, mask)
    single = model.forward_txt_feature_single(ids, mask)
    sets = model.forward_txt_feature(ids[:, None].expand(-1, 3, -1), mask[:, None].expand(-1, 3, -1))
    other_pad = ids.clone()
    other_pad[1, 6:] = 7
    padded = model.encode_text(other_pad, mask)
  assert out["hidden"].shape == (2, 10, TINY["text_hidden"]) and out["local"].shape == (2, 9, TINY["proj_dim"])
  torch.testing.assert_close(single, out["global"], rtol=0, atol=0)
  torch.testing.assert_close(out["global"].norm(dim=-1), torch.ones(2), rtol=0, atol=1e-6)
  head = model.bert_encoder.cls_projection_head(out["hidden"][:, 0])
  torch.testing.assert_close(out["global"], F.normalize(head, dim=-1), rtol=0, atol=ATOL)
  local = model.bert_encoder.local_projection_head(out["hidden"][:, 1:])
  torch.testing.assert_close(out["local"], local, rtol=0, atol=ATOL)
  assert sets.shape == (2, 3, TINY["proj_dim"])
  torch.testing.assert_close(F.normalize(sets[:, 1], dim=-1), out["global"], rtol=0, atol=ATOL)
  # Masked positions are never attended to.
  torch.testing.assert_close(padded["hidden"][1, :6], out["hidden"][1, :6], rtol=0, atol=ATOL)
