"""ClinVLA in PyTorch, assembled from peer parts, for side-by-side benchmarks.

* Image tower: timm ``VisionTransformer`` blocks and final norm.  What timm
  lacks is added around them exactly as ``clinvla_jax.model.vit`` does it:
  pre-masked patch input embedded with the patch convolution's weight as a
  matmul, gathered fixed sin-cos positions, the learned missing-view token,
  view / time embeddings, and a bottleneck adapter after each block's MLP
  inside its residual (a forward hook on ``block.mlp``, so timm's parameter
  names stay untouched).
* Text tower: transformers ``BertModel`` (no pooler).  The invertible adapter
  acts on the embedding output (a forward hook) and every layer's
  ``BertOutput`` is switched to a subclass that runs the language and task
  adapters after the feed-forward output, before the residual LayerNorm.
* Heads and losses: small torch modules, the same functions as
  ``clinvla_jax.model.clinvla`` and ``clinvla_jax.losses`` (InfoNCE + GLoRIA).

Weights come from an initialised JAX tree: the backbone through the inverse
of the converters' plans (``convert.hf_bert`` / ``convert.timm_vit``), the rest
through a direct name map.  Trainable / frozen follows the JAX path rules
(``config.optim.param_groups``) applied to the JAX name of each tensor.

``TorchALTA`` (end of the file) is a separate model: ALTA, the PyTorch peer,
rebuilt with ALTA's state-dict names so that ALTA checkpoints load into it and
the JAX port of ALTA can be checked against it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from clinvla_jax import optim as optim_lib
from clinvla_jax.convert import hf_bert
from clinvla_jax.convert import timm_vit
from clinvla_jax.model.clinvla import ClinVLAConfig
from clinvla_jax.model.vit import VIEW_TIME, VIEW_TYPE, sincos_2d_position_embedding


class Bottleneck(nn.Module):
  """h -> down -> ReLU -> up (no residual), the torch twin of layers.BottleneckAdapter."""

  def __init__(self, width: int, bottleneck: int):
    super().__init__()
    self.down = nn.Linear(width, bottleneck)
    self.up = nn.Linear(bottleneck, width)

  def forward(self, x):
    return self.up(F.relu(self.down(x)))


class InvertibleAdapter(nn.Module):
  """NICE coupling o1 = e1 + F(e2), o2 = e2 + G(o1)."""

  def __init__(self, width: int):
    super().__init__()
    self.F = Bottleneck(width // 2, width // 4)
    self.G = Bottleneck(width // 2, width // 4)

  def forward(self, e):
    e1, e2 = e.chunk(2, dim=-1)
    o1 = e1 + self.F(e2)
    o2 = e2 + self.G(o1)
    return torch.cat([o1, o2], dim=-1)


class ProjectionHead(nn.Module):
  def __init__(self, width: int, proj: int, eps: float = 1e-6):
    super().__init__()
    self.dense1 = nn.Linear(width, width)
    self.norm = nn.LayerNorm(width, eps=eps)
    self.dense2 = nn.Linear(width, proj)

  def forward(self, x):
    return self.dense2(F.gelu(self.norm(self.dense1(x))))


def _adapted_bert_output_forward(self, hidden_states, input_tensor):
  # BertOutput with MAD-X adapters between the dropout and the residual LayerNorm.
  y = self.dropout(self.dense(hidden_states))
  lang = self.language_adapter(y) + y
  y = self.task_adapter(lang) + y
  return self.LayerNorm(y + input_tensor)


def _add_adapter_hook(module, adapter):
  def hook(_, __, output):
    return output + adapter(output)

  module.register_forward_hook(hook)


class ImageTower(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    from timm.models.vision_transformer import VisionTransformer

    self.cfg = cfg
    self.vit = VisionTransformer(
      img_size=cfg.image_size,
      patch_size=cfg.patch_size,
      in_chans=cfg.channels,
      num_classes=0,
      global_pool="token",
      embed_dim=cfg.hidden_size,
      depth=cfg.num_layers,
      num_heads=cfg.num_heads,
      mlp_ratio=cfg.mlp_dim / cfg.hidden_size,
      qkv_bias=True,
      class_token=True,
    )
    if cfg.adapter_dim:
      for block in self.vit.blocks:
        block.adapter = Bottleneck(cfg.hidden_size, cfg.adapter_dim)
        _add_adapter_hook(block.mlp, block.adapter)
    width = cfg.hidden_size
    self.missing_token = nn.Parameter(torch.zeros(width))
    self.view_embed = nn.Parameter(torch.zeros(2, width))
    self.time_embed = nn.Parameter(torch.zeros(2, width))
    self.register_buffer(
      "pos_table", torch.from_numpy(sincos_2d_position_embedding(cfg.grid_size, width)), persistent=False
    )

  def forward(self, patches, patch_idx, view_valid, view_slots: Sequence[int]):
    cfg = self.cfg
    batch, num_views, num_kept, patch_dim = patches.shape
    width = cfg.hidden_size
    if patches.dtype == torch.uint8:
      x = (patches.float() / 255.0 - cfg.pixel_mean) / cfg.pixel_std
    else:
      x = patches.float()
    x = x.reshape(batch * num_views, num_kept, patch_dim)
    conv = self.vit.patch_embed.proj
    # Conv weight [D, C, p, p] -> [D, (row, col, channel)], our patch vector order.
    kernel = conv.weight.permute(0, 2, 3, 1).reshape(width, -1)
    pixels = cfg.patch_size * cfg.patch_size
    if patch_dim == pixels and cfg.channels > 1:
      kernel = kernel.reshape(width, pixels, cfg.channels).sum(-1)
    tokens = F.linear(x, kernel, conv.bias)
    pos = self.pos_table
    flat_idx = patch_idx.reshape(batch * num_views, num_kept).long()
    tokens = tokens + pos[flat_idx + 1]
    cls = (self.vit.cls_token.reshape(1, 1, width) + pos[:1]).expand(batch * num_views, 1, width)
    tokens = torch.cat([cls, tokens], dim=1).reshape(batch, num_views, 1 + num_kept, width)
    missing_seq = self.missing_token + torch.cat(
      [pos[:1].expand(batch, num_views, 1, width), pos[patch_idx.long() + 1]], dim=2
    )
    tokens = torch.where(view_valid.bool()[:, :, None, None], tokens, missing_seq)
    slot_type = torch.tensor([VIEW_TYPE[s] for s in view_slots], device=tokens.device)
    slot_time = torch.tensor([VIEW_TIME[s] for s in view_slots], device=tokens.device)
    tokens = tokens + (self.view_embed[slot_type] + self.time_embed[slot_time])[None, :, None, :]
    x = tokens.reshape(batch * num_views, 1 + num_kept, width)
    x = self.vit.blocks(x)
    x = self.vit.norm(x)
    return x.reshape(batch, num_views, 1 + num_kept, width)


class TextTower(nn.Module):
  def __init__(self, cfg, attn_implementation: str = "sdpa"):
    super().__init__()
    import transformers
    from transformers.models.bert import modeling_bert

    bert_cfg = transformers.BertConfig(
      vocab_size=cfg.vocab_size,
      hidden_size=cfg.hidden_size,
      num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads,
      intermediate_size=cfg.mlp_dim,
      hidden_act="gelu",
      hidden_dropout_prob=cfg.dropout,
      attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_len,
      type_vocab_size=cfg.type_vocab_size,
      layer_norm_eps=cfg.layer_norm_eps,
    )
    bert_cfg._attn_implementation = attn_implementation
    self.bert = transformers.BertModel(bert_cfg, add_pooling_layer=False)
    self.cfg = cfg
    if cfg.invertible_adapter:
      self.invertible_adapter = InvertibleAdapter(cfg.hidden_size)
      self.bert.embeddings.register_forward_hook(lambda _, __, out: self.invertible_adapter(out))
    if cfg.use_adapters:
      for layer in self.bert.encoder.layer:
        out = layer.output
        assert isinstance(out, modeling_bert.BertOutput)
        out.language_adapter = Bottleneck(cfg.hidden_size, cfg.adapter_dim)
        out.task_adapter = Bottleneck(cfg.hidden_size, cfg.adapter_dim)
        out.forward = _adapted_bert_output_forward.__get__(out)

  def forward(self, input_ids, attention_mask):
    return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def l2_normalize(x, eps=1e-6):
  return x * torch.rsqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=eps * eps))


def text_local_mask(attention_mask):
  mask = attention_mask.bool()
  length = mask.sum(1, keepdim=True)
  positions = torch.arange(mask.shape[1], device=mask.device)[None, :]
  return mask & (positions > 0) & (positions < length - 1)


class TorchClinVLA(nn.Module):
  def __init__(self, mcfg: ClinVLAConfig, attn_implementation: str = "sdpa"):
    super().__init__()
    self.mcfg = mcfg
    self.image_tower = ImageTower(mcfg.image)
    self.text_tower = TextTower(mcfg.text, attn_implementation)
    self.image_global_head = ProjectionHead(mcfg.image.hidden_size, mcfg.proj_dim)
    self.image_local_head = ProjectionHead(mcfg.image.hidden_size, mcfg.proj_dim)
    self.text_global_head = ProjectionHead(mcfg.text.hidden_size, mcfg.proj_dim)
    self.text_local_head = ProjectionHead(mcfg.text.hidden_size, mcfg.proj_dim)
    self.logit_scale = nn.Parameter(torch.tensor(float(mcfg.logit_scale_init)))
    if mcfg.learn_local_temperatures:
      self.local_log_temperatures = nn.Parameter(torch.log(torch.tensor(mcfg.local_temperatures)))
    else:
      self.register_buffer("fixed_temperatures", torch.tensor(mcfg.local_temperatures), persistent=False)

  def local_temperatures(self):
    if self.mcfg.learn_local_temperatures:
      return torch.exp(self.local_log_temperatures)
    return self.fixed_temperatures

  def encode_image(self, patches, patch_idx, view_valid, view_slots=None, with_local: bool = True):
    num_views = patches.shape[1]
    if view_slots is None:
      if num_views == 4:
        view_slots = self.mcfg.view_slots
        if tuple(view_slots) != (0, 1, 2, 3):
          sel = list(view_slots)
          patches, patch_idx, view_valid = patches[:, sel], patch_idx[:, sel], view_valid[:, sel]
      else:
        view_slots = tuple(range(num_views))
    view_valid = view_valid.bool()
    hidden = self.image_tower(patches, patch_idx, view_valid, tuple(view_slots))
    batch, used_views, seq, _ = hidden.shape
    weights = view_valid.float()
    pooled = (hidden[:, :, 0, :] * weights[..., None]).sum(1) / torch.clamp(weights.sum(1, keepdim=True), min=1.0)
    global_emb = l2_normalize(self.image_global_head(pooled))
    if not with_local:  # embedding only: skip the local head, as XLA prunes it on the JAX side
      return {"global": global_emb, "hidden": hidden}
    local = self.image_local_head(hidden[:, :, 1:, :]).reshape(batch, used_views * (seq - 1), -1)
    local_mask = view_valid.repeat_interleave(seq - 1, dim=1)
    return {"global": global_emb, "local": local, "local_mask": local_mask, "hidden": hidden}

  def encode_text(self, input_ids, attention_mask, with_local: bool = True):
    hidden = self.text_tower(input_ids.long(), attention_mask.long())
    if not with_local:
      return {"global": l2_normalize(self.text_global_head(hidden[:, 0])), "hidden": hidden}
    return {
      "global": l2_normalize(self.text_global_head(hidden[:, 0])),
      "local": self.text_local_head(hidden),
      "local_mask": text_local_mask(attention_mask),
      "hidden": hidden,
    }

  def forward(self, patches, patch_idx, view_valid, input_ids, attention_mask):
    return {
      "image": self.encode_image(patches, patch_idx, view_valid),
      "text": self.encode_text(input_ids, attention_mask),
      "logit_scale": self.logit_scale,
      "local_temperatures": self.local_temperatures(),
    }


# ---------------------------------------------------------------- losses

_NEG = -1e30


def _masked_cross_entropy(logits, valid):
  logits = torch.where(valid[None, :], logits, torch.full_like(logits, _NEG))
  nll = -torch.diagonal(F.log_softmax(logits, dim=-1))
  return torch.where(valid, nll, torch.zeros_like(nll)).sum() / torch.clamp(valid.sum(), min=1)


def infonce_loss(image_emb, text_emb, logit_scale, valid, max_logit_scale):
  scale = torch.exp(torch.clamp(logit_scale, max=max_logit_scale))
  logits = scale * image_emb @ text_emb.T
  return 0.5 * (_masked_cross_entropy(logits, valid) + _masked_cross_entropy(logits.T, valid))


def _cosine(a, b, eps=1e-8):
  inv_a = torch.rsqrt(torch.clamp((a * a).sum(-1), min=eps * eps))
  inv_b = torch.rsqrt(torch.clamp((b * b).sum(-1), min=eps * eps))
  return (a * b).sum(-1) * inv_a * inv_b


def _masked_softmax(logits, mask, dim):
  weights = F.softmax(torch.where(mask, logits, torch.full_like(logits, _NEG)), dim=dim)
  return torch.where(mask, weights, torch.zeros_like(weights))


def gloria_local_loss(words, word_mask, regions, region_mask, temperatures, valid):
  temp1, temp2, temp3 = temperatures[0], temperatures[1], temperatures[2]
  word_mask, region_mask = word_mask.bool(), region_mask.bool()
  scores = torch.einsum("itp,jrp->ijrt", words, regions)
  over_words = _masked_softmax(scores, word_mask[:, None, None, :], dim=-1)
  over_regions = _masked_softmax(temp1 * over_words, region_mask[None, :, :, None], dim=2)
  context = torch.einsum("ijrt,jrp->ijtp", over_regions, regions)
  cos = _cosine(words[:, None], context)
  mask = word_mask[:, None, :]
  sim = torch.logsumexp(torch.where(mask, temp2 * cos, torch.full_like(cos, _NEG)), dim=-1)
  sim = torch.where(mask.any(-1), sim, torch.zeros_like(sim))
  scores = temp3 * sim.T
  return _masked_cross_entropy(scores, valid) + _masked_cross_entropy(scores.T, valid)


def clinvla_loss(outputs, loss_cfg, example_valid=None):
  """InfoNCE + lambda * GLoRIA (the configuration the benchmark times)."""
  # Float32 throughout, as clinvla_jax.losses does whatever the model's dtype.
  image = {k: (v.float() if v.is_floating_point() else v) for k, v in outputs["image"].items()}
  text = {k: (v.float() if v.is_floating_point() else v) for k, v in outputs["text"].items()}
  batch = image["global"].shape[0]
  device = image["global"].device
  valid = torch.ones(batch, dtype=torch.bool, device=device) if example_valid is None else example_valid.bool()
  if loss_cfg.global_type != "infonce" or loss_cfg.local_type != "gloria":
    raise NotImplementedError("the PyTorch twin implements the default losses (infonce + gloria) only")
  total = torch.zeros((), device=device)
  if loss_cfg.use_global:
    total = total + infonce_loss(
      image["global"], text["global"], outputs["logit_scale"].float(), valid, float(loss_cfg.max_logit_scale)
    )
  if loss_cfg.use_local:
    total = total + loss_cfg.local_weight * gloria_local_loss(
      text["local"],
      text["local_mask"],
      image["local"],
      image["local_mask"],
      outputs["local_temperatures"].float(),
      valid,
    )
  return total


# ---------------------------------------------------------------- weights


def _inverse_transform(transform, ours: np.ndarray, theirs_shape: Tuple[int, ...]) -> np.ndarray:
  """Undoes a converter transform, which only reshapes and permutes entries.

  Running the transform on the entry indices of the source shape tells where
  each source entry lands in our array; scattering ours back through it
  gives the source tensor.
  """
  index = np.arange(int(np.prod(theirs_shape)), dtype=np.int64).reshape(theirs_shape)
  where = np.asarray(transform(index))
  if where.shape != ours.shape:
    raise ValueError(f"transform maps {theirs_shape} to {where.shape}, ours is {ours.shape}")
  out = np.empty(index.size, dtype=np.float32)
  out[where.reshape(-1)] = np.asarray(ours, np.float32).reshape(-1)
  return out.reshape(theirs_shape)


def _linear(prefix_ours: Tuple[str, ...], prefix_theirs: str) -> Dict:
  # Our dense kernel [in, out] is the transposed torch Linear weight.
  return {
    prefix_ours + ("kernel",): (f"{prefix_theirs}.weight", lambda k: np.asarray(k).T),
    prefix_ours + ("bias",): (f"{prefix_theirs}.bias", np.asarray),
  }


def _norm(prefix_ours, prefix_theirs) -> Dict:
  return {
    prefix_ours + ("scale",): (f"{prefix_theirs}.weight", np.asarray),
    prefix_ours + ("bias",): (f"{prefix_theirs}.bias", np.asarray),
  }


def _head(ours, theirs) -> Dict:
  out = {}
  out.update(_linear(ours + ("dense1",), f"{theirs}.dense1"))
  out.update(_norm(ours + ("norm",), f"{theirs}.norm"))
  out.update(_linear(ours + ("dense2",), f"{theirs}.dense2"))
  return out


def _bottleneck(ours, theirs) -> Dict:
  out = {}
  out.update(_linear(ours + ("down",), f"{theirs}.down"))
  out.update(_linear(ours + ("up",), f"{theirs}.up"))
  return out


def torch_values_from_jax(model: TorchClinVLA, params: dict) -> Dict[str, Tuple[Tuple[str, ...], np.ndarray]]:
  """torch state name -> (JAX path, value) for every tensor the JAX tree defines."""
  from flax import traverse_util

  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}
  state = model.state_dict()
  out = {}
  # Backbones: invert the converters' plans.
  vit_state = {k[len("image_tower.vit.") :]: v for k, v in state.items() if k.startswith("image_tower.vit.")}
  for ours, (key, transform) in timm_vit.build_plan(params).items():
    out[f"image_tower.vit.{key}"] = (ours, _inverse_transform(transform, flat[ours], tuple(vit_state[key].shape)))
  bert_state = {k[len("text_tower.bert.") :]: v for k, v in state.items() if k.startswith("text_tower.bert.")}
  for ours, (key, transform) in hf_bert.build_plan(params, bert_state).items():
    theirs_shape = tuple(bert_state[key].shape)
    out[f"text_tower.bert.{key}"] = (ours, _inverse_transform(transform, flat[ours], theirs_shape))

  # Everything the peers do not have: a direct name map.
  direct: Dict = {}
  I, T = ("image_tower",), ("text_tower",)
  for name in ("missing_token", "view_embed", "time_embed"):
    direct[I + (name,)] = (f"image_tower.{name}", np.asarray)
  tower = params["image_tower"]
  for i in range(sum(1 for k in tower if k.startswith("blocks_"))):
    if "adapter" in tower[f"blocks_{i}"]:
      direct.update(_bottleneck(I + (f"blocks_{i}", "adapter"), f"image_tower.vit.blocks.{i}.adapter"))
  text = params["text_tower"]
  if "invertible_adapter" in text:
    for part in ("F", "G"):
      direct.update(_bottleneck(T + ("invertible_adapter", part), f"text_tower.invertible_adapter.{part}"))
  for i in range(sum(1 for k in text if k.startswith("layer_"))):
    for name in ("language_adapter", "task_adapter"):
      if name in text[f"layer_{i}"]:
        direct.update(_bottleneck(T + (f"layer_{i}", name), f"text_tower.bert.encoder.layer.{i}.output.{name}"))
  for head in ("image_global_head", "image_local_head", "text_global_head", "text_local_head"):
    direct.update(_head((head,), head))
  direct[("logit_scale",)] = ("logit_scale", np.asarray)
  if ("local_log_temperatures",) in flat:
    direct[("local_log_temperatures",)] = ("local_log_temperatures", np.asarray)
  for ours, (key, fn) in direct.items():
    out[key] = (ours, np.asarray(fn(flat[ours]), np.float32))

  unused = set(flat) - {ours for ours, _ in out.values()}
  if unused:
    raise ValueError(f"JAX parameters with no torch counterpart: {sorted('/'.join(p) for p in unused)}")
  return out


def from_jax(
  mcfg: ClinVLAConfig, params: dict, param_groups, attn_implementation: str = "sdpa"
) -> Tuple[TorchClinVLA, Dict[str, str]]:
  """A TorchClinVLA holding ``params``; returns it and {torch name: optimizer group}.

  Parameters whose JAX path the rules call "frozen" (and peer tensors that
  ClinVLA does not use, e.g. timm's learned pos_embed) get requires_grad=False.
  """
  model = TorchClinVLA(mcfg, attn_implementation)
  values = torch_values_from_jax(model, params)
  state = model.state_dict()
  missing = []
  with torch.no_grad():
    for name, tensor in state.items():
      if name in values:
        value = torch.from_numpy(np.array(values[name][1], np.float32))
        if tuple(value.shape) != tuple(tensor.shape):
          raise ValueError(f"{name}: JAX gives {tuple(value.shape)}, torch expects {tuple(tensor.shape)}")
        tensor.copy_(value)
      else:
        missing.append(name)
  # Peer tensors we never read (timm's learned pos_embed) may stay as they are.
  unexpected = [m for m in missing if not re.fullmatch(r"image_tower\.vit\.(pos_embed|head\..*)", m)]
  if unexpected:
    raise ValueError(f"torch tensors with no JAX value: {unexpected}")
  groups = {}
  for name, p in model.named_parameters():
    if name in values:
      group = optim_lib.group_of("/".join(values[name][0]), param_groups)
    else:
      group = optim_lib.FROZEN
    p.requires_grad_(group != optim_lib.FROZEN)
    groups[name] = group
  return model, groups


def make_optimizer(model: TorchClinVLA, groups: Dict[str, str], learning_rates, weight_decay: float):
  by_group: Dict[str, list] = {}
  for name, p in model.named_parameters():
    if groups[name] != optim_lib.FROZEN:
      by_group.setdefault(groups[name], []).append(p)
  return torch.optim.AdamW(
    [{"params": ps, "lr": float(learning_rates[g])} for g, ps in sorted(by_group.items())], weight_decay=weight_decay
  )


def to_torch_batch(batch: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
  return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


# ---------------------------------------------------------------- ALTA twin
#
# An independent PyTorch model with the function and the state-dict names of
# ALTA (Lian et al., IEEE TMI 2025; github.com/DopamineLcy/ALTA): an MRM
# ViT-B/16 with bottleneck adapters, a CXR-BERT-specialized text encoder with
# the same adapters, and the MAE-style decoder / MLM head that only
# pretraining uses.  ALTA's code is CC BY-NC 4.0, so none of it is reused
# here; the twin exists to check that a converter reads ALTA checkpoints right.


@dataclasses.dataclass(frozen=True)
class AltaSizes:
  """Every size TorchALTA and alta_key_names need; the defaults are ALTA's published model."""

  image_size: int = 224
  patch_size: int = 16
  in_chans: int = 3
  image_layers: int = 12
  image_hidden: int = 768
  image_heads: int = 12
  image_mlp_dim: int = 3072
  image_adapter_ratio: float = 0.25
  image_adapter_dim: Optional[int] = None  # None: int(image_hidden * image_adapter_ratio)
  image_norm_eps: float = 1e-6
  text_layers: int = 12
  text_hidden: int = 768
  text_heads: int = 12
  text_intermediate: int = 3072
  vocab_size: int = 30522
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  text_adapter_ratio: float = 0.25
  text_adapter_dim: Optional[int] = None  # None: int(text_hidden * text_adapter_ratio)
  pad_token_id: int = 0
  proj_dim: int = 128
  decoder_embed_dim: int = 768
  decoder_depth: int = 4
  decoder_num_heads: int = 6
  decoder_mlp_dim: Optional[int] = None  # None: 4 * decoder_embed_dim

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid * self.grid

  @property
  def image_bottleneck(self) -> int:
    return self.image_adapter_dim or int(self.image_hidden * self.image_adapter_ratio)

  @property
  def text_bottleneck(self) -> int:
    return self.text_adapter_dim or int(self.text_hidden * self.text_adapter_ratio)

  @property
  def decoder_hidden(self) -> int:
    return self.decoder_mlp_dim or 4 * self.decoder_embed_dim

  @property
  def pred_dim(self) -> int:
    # ALTA's decoder reconstructs the 448-pixel input: patches twice the encoder's side.
    return (2 * self.patch_size) ** 2 * self.in_chans


# Small enough for a test on two cores; every tensor kind of the published model is there.
ALTA_TINY_SIZES = dict(
  image_size=64,
  patch_size=16,
  image_layers=2,
  image_hidden=64,
  image_heads=4,
  image_mlp_dim=128,
  text_layers=2,
  text_hidden=64,
  text_heads=4,
  text_intermediate=128,
  vocab_size=97,
  max_position_embeddings=24,
  proj_dim=32,
  decoder_embed_dim=32,
  decoder_depth=1,
  decoder_num_heads=2,
)

ALTA_VIEW_TYPE = (0, 1, 0, 1)  # current frontal, current lateral, prior frontal, prior lateral
ALTA_VIEW_TIME = (0, 0, 1, 1)


def _alta_sizes(sizes: Optional[AltaSizes], overrides) -> AltaSizes:
  return dataclasses.replace(sizes or AltaSizes(), **overrides)


class _ShapeTable:
  """Name -> shape of state-dict tensors, kept in the order they are added (the order torch saves them)."""

  def __init__(self, s: AltaSizes):
    self.s = s
    self.shapes: Dict[str, Tuple[int, ...]] = {}

  def linear(self, name, n_in, n_out):
    self.shapes[f"{name}.weight"] = (n_out, n_in)
    self.shapes[f"{name}.bias"] = (n_out,)

  def norm(self, name, width):
    self.shapes[f"{name}.weight"] = (width,)
    self.shapes[f"{name}.bias"] = (width,)

  def adapters(self, name, width, bottleneck):
    for adapter in ("attn_adapter", "mlp_adapter"):
      self.linear(f"{name}.{adapter}.D_fc1", width, bottleneck)
      self.linear(f"{name}.{adapter}.D_fc2", bottleneck, width)

  def vit_block(self, name, width, hidden, bottleneck):
    self.norm(f"{name}.norm1", width)
    self.linear(f"{name}.attn.qkv", width, 3 * width)
    self.linear(f"{name}.attn.proj", width, width)
    self.norm(f"{name}.norm2", width)
    self.linear(f"{name}.mlp.fc1", width, hidden)
    self.linear(f"{name}.mlp.fc2", hidden, width)
    if bottleneck:
      self.adapters(name, width, bottleneck)

  def head(self, name, width):
    P = self.s.proj_dim
    self.linear(f"{name}.dense_to_hidden", width, P)
    self.norm(f"{name}.LayerNorm", P)
    self.linear(f"{name}.dense_to_output", P, P)


def _alta_image_keys(t: _ShapeTable) -> None:
  """The ViT encoder, the MAE decoder and the image heads."""
  s = t.s
  D, N, E = s.image_hidden, s.num_patches, s.decoder_embed_dim
  # A module's own parameters come before its children's.
  t.shapes["cls_token"] = (1, 1, D)
  t.shapes["missing_token"] = (1, N, D)
  t.shapes["pos_embed"] = (1, N + 1, D)
  t.shapes["temporal_embedding"] = (1, 2, D)
  t.shapes["view_embedding"] = (1, 2, D)
  t.shapes["mask_token"] = (1, 1, E)
  t.shapes["decoder_pos_embed"] = (1, N + 1, E)
  for name in ("logit_scale", "logit_scale_local1", "logit_scale_local2", "logit_scale_local3"):
    t.shapes[name] = ()
  t.shapes["patch_embed.proj.weight"] = (D, s.in_chans, s.patch_size, s.patch_size)
  t.shapes["patch_embed.proj.bias"] = (D,)
  for i in range(s.image_layers):
    t.vit_block(f"blocks.{i}", D, s.image_mlp_dim, s.image_bottleneck)
  t.norm("norm", D)
  t.linear("bert_embed", D, D)
  t.linear("decoder_embed", D, E)
  for i in range(s.decoder_depth):
    t.vit_block(f"decoder_blocks.{i}", E, s.decoder_hidden, 0)
  t.norm("decoder_norm", E)
  t.linear("decoder_pred", E, s.pred_dim)
  t.head("projection_head", D)
  t.head("local_projection_head", D)


def _alta_text_keys(t: _ShapeTable) -> None:
  """The adapted BERT under ``bert_encoder``, its MLM head and the text heads."""
  s = t.s
  H = s.text_hidden
  emb = "bert_encoder.bert.embeddings"
  t.shapes[f"{emb}.word_embeddings.weight"] = (s.vocab_size, H)
  t.shapes[f"{emb}.position_embeddings.weight"] = (s.max_position_embeddings, H)
  t.shapes[f"{emb}.token_type_embeddings.weight"] = (s.type_vocab_size, H)
  t.norm(f"{emb}.LayerNorm", H)
  for i in range(s.text_layers):
    layer = f"bert_encoder.bert.encoder.layer.{i}"
    for part in ("query", "key", "value"):
      t.linear(f"{layer}.attention.self.{part}", H, H)
    t.linear(f"{layer}.attention.output.dense", H, H)
    t.norm(f"{layer}.attention.output.LayerNorm", H)
    t.linear(f"{layer}.intermediate.dense", H, s.text_intermediate)
    t.linear(f"{layer}.output.dense", s.text_intermediate, H)
    t.norm(f"{layer}.output.LayerNorm", H)
    t.adapters(layer, H, s.text_bottleneck)
  t.shapes["bert_encoder.cls.predictions.bias"] = (s.vocab_size,)
  t.linear("bert_encoder.cls.predictions.transform.dense", H, H)
  t.norm("bert_encoder.cls.predictions.transform.LayerNorm", H)
  t.linear("bert_encoder.cls.predictions.decoder", H, s.vocab_size)
  t.head("bert_encoder.cls_projection_head", H)
  t.head("bert_encoder.local_projection_head", H)


def alta_key_names(
  image_layers: Optional[int] = None,
  text_layers: Optional[int] = None,
  decoder_depth: Optional[int] = None,
  sizes: Optional[AltaSizes] = None,
  **overrides,
) -> Dict[str, Tuple[int, ...]]:
  """Name -> shape of every tensor in ALTA's state dict, in its order.

  Sizes: ``sizes`` (default AltaSizes(), the published model) with any field
  overridden by keyword, e.g. ``alta_key_names(**ALTA_TINY_SIZES)``.

  Spelled out from the shapes ALTA's modules create, not from TorchALTA, so that
  the two can be checked against each other.  transformers 4.31 and later keep
  BertEmbeddings' position_ids / token_type_ids out of the state dict
  (non-persistent buffers); the tied MLM decoder weight and bias are saved under
  their own names as well as under word_embeddings / cls.predictions.bias.
  """
  depths = dict(image_layers=image_layers, text_layers=text_layers, decoder_depth=decoder_depth)
  s = _alta_sizes(sizes, dict(overrides, **{k: v for k, v in depths.items() if v is not None}))
  table = _ShapeTable(s)
  _alta_image_keys(table)
  _alta_text_keys(table)
  return table.shapes


def alta_position_table(dim: int, grid: int) -> np.ndarray:
  """ALTA's fixed sin-cos table, float32 [1 + grid**2, dim], row 0 (CLS) zeros.

  Patch r * grid + c gets [sin(c w), cos(c w), sin(r w), cos(r w)] with
  w_i = 10000**(-i / dim), i < dim / 4.  MAE's table uses 10000**(-4 i / dim);
  MRM and ALTA shrink the exponent four-fold, and their weights were trained
  with this narrower band, so it must be reproduced, not replaced by MAE's.
  """
  if dim % 4:
    raise ValueError(f"the sin-cos table needs dim % 4 == 0, got {dim}")
  freqs = 10000.0 ** (-np.arange(dim // 4, dtype=np.float64) / dim)
  rows, cols = np.divmod(np.arange(grid * grid, dtype=np.float64), grid)

  def axis(pos):
    angles = pos[:, None] * freqs[None, :]
    return [np.sin(angles), np.cos(angles)]

  table = np.concatenate(axis(cols) + axis(rows), axis=1)
  return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


class AltaAdapter(nn.Module):
  """Bottleneck D_fc2(GELU(D_fc1(x))), plus x when ``skip``."""

  def __init__(self, width: int, bottleneck: int, skip: bool):
    super().__init__()
    self.skip = skip
    self.D_fc1 = nn.Linear(width, bottleneck)
    self.D_fc2 = nn.Linear(bottleneck, width)

  def forward(self, x):
    y = self.D_fc2(F.gelu(self.D_fc1(x)))
    return x + y if self.skip else y


class _AltaAttention(nn.Module):
  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(width, 3 * width)
    self.proj = nn.Linear(width, width)

  def forward(self, x):
    b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5, dim=-1)
    return self.proj((weights @ v).transpose(1, 2).reshape(b, n, c))


class _AltaMlp(nn.Module):
  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class AltaBlock(nn.Module):
  """Pre-LN ViT block (timm names); with ``bottleneck`` ALTA's two adapters join it.

  x += attn_adapter(attn(norm1(x))) (adapter with skip), then
  x += mlp(xn) + 0.5 * mlp_adapter(xn) with xn = norm2(x) (adapter without skip).
  """

  def __init__(self, width: int, heads: int, hidden: int, eps: float, bottleneck: int = 0):
    super().__init__()
    self.norm1 = nn.LayerNorm(width, eps=eps)
    self.attn = _AltaAttention(width, heads)
    self.norm2 = nn.LayerNorm(width, eps=eps)
    self.mlp = _AltaMlp(width, hidden)
    if bottleneck:
      self.attn_adapter = AltaAdapter(width, bottleneck, skip=True)
      self.mlp_adapter = AltaAdapter(width, bottleneck, skip=False)
    else:
      self.attn_adapter = self.mlp_adapter = None

  def forward(self, x):
    a = self.attn(self.norm1(x))
    if self.attn_adapter is None:
      x = x + a
      return x + self.mlp(self.norm2(x))
    x = x + self.attn_adapter(a)
    xn = self.norm2(x)
    return x + (self.mlp(xn) + 0.5 * self.mlp_adapter(xn))


class _AltaPatchEmbed(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.image_size = s.image_size
    self.proj = nn.Conv2d(s.in_chans, s.image_hidden, s.patch_size, stride=s.patch_size)

  def forward(self, x):
    if tuple(x.shape[-2:]) != (self.image_size, self.image_size):
      raise ValueError(f"images must be {self.image_size}x{self.image_size}, got {tuple(x.shape[-2:])}")
    return self.proj(x).flatten(2).transpose(1, 2)


class AltaProjectionHead(nn.Module):
  """Linear(width -> P), GELU, LayerNorm(P, eps 1e-12), Linear(P -> P): ALTA's image and text heads alike."""

  def __init__(self, width: int, proj: int):
    super().__init__()
    self.dense_to_hidden = nn.Linear(width, proj)
    self.LayerNorm = nn.LayerNorm(proj, eps=1e-12)
    self.dense_to_output = nn.Linear(proj, proj)

  def forward(self, x):
    return self.dense_to_output(self.LayerNorm(F.gelu(self.dense_to_hidden(x))))


class _BertEmbeddings(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.word_embeddings = nn.Embedding(s.vocab_size, s.text_hidden, padding_idx=s.pad_token_id)
    self.position_embeddings = nn.Embedding(s.max_position_embeddings, s.text_hidden)
    self.token_type_embeddings = nn.Embedding(s.type_vocab_size, s.text_hidden)
    self.LayerNorm = nn.LayerNorm(s.text_hidden, eps=s.layer_norm_eps)

  def forward(self, input_ids):
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    x = self.word_embeddings(input_ids) + self.token_type_embeddings(torch.zeros_like(input_ids))
    return self.LayerNorm(x + self.position_embeddings(positions)[None])


class _BertSelfAttention(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.heads = s.text_heads
    self.query = nn.Linear(s.text_hidden, s.text_hidden)
    self.key = nn.Linear(s.text_hidden, s.text_hidden)
    self.value = nn.Linear(s.text_hidden, s.text_hidden)

  def forward(self, x, additive_mask):
    b, t, c = x.shape
    d = c // self.heads

    def split(y):
      return y.reshape(b, t, self.heads, d).transpose(1, 2)

    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d) + additive_mask
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, c)


class _BertResidualNorm(nn.Module):
  """dense, then LayerNorm of (that + the residual input): BERT's SelfOutput and Output."""

  def __init__(self, n_in: int, width: int, eps: float):
    super().__init__()
    self.dense = nn.Linear(n_in, width)
    self.LayerNorm = nn.LayerNorm(width, eps=eps)

  def forward(self, x, residual):
    return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.self = _BertSelfAttention(s)
    self.output = _BertResidualNorm(s.text_hidden, s.text_hidden, s.layer_norm_eps)

  def forward(self, x, additive_mask):
    return self.output(self.self(x, additive_mask), x)


class _BertIntermediate(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.dense = nn.Linear(s.text_hidden, s.text_intermediate)

  def forward(self, x):
    return F.gelu(self.dense(x))


class AltaBertLayer(nn.Module):
  """Post-LN BERT layer with ALTA's adapters.

  a = attn_adapter(attention(x)) (with skip; attention ends in its LayerNorm),
  out = LN(dense(intermediate(a)) + a) + 0.5 * mlp_adapter(a) (adapter without skip,
  added after the output LayerNorm, so the layer's output is not normalised).
  """

  def __init__(self, s: AltaSizes):
    super().__init__()
    self.attention = _BertAttention(s)
    self.intermediate = _BertIntermediate(s)
    self.output = _BertResidualNorm(s.text_intermediate, s.text_hidden, s.layer_norm_eps)
    self.attn_adapter = AltaAdapter(s.text_hidden, s.text_bottleneck, skip=True)
    self.mlp_adapter = AltaAdapter(s.text_hidden, s.text_bottleneck, skip=False)

  def forward(self, x, additive_mask):
    a = self.attn_adapter(self.attention(x, additive_mask))
    return self.output(self.intermediate(a), a) + 0.5 * self.mlp_adapter(a)


class _BertEncoder(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.layer = nn.ModuleList([AltaBertLayer(s) for _ in range(s.text_layers)])


class _BertBody(nn.Module):
  # BertForMaskedLM builds its BertModel without a pooler.
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.embeddings = _BertEmbeddings(s)
    self.encoder = _BertEncoder(s)

  def forward(self, input_ids, attention_mask):
    x = self.embeddings(input_ids)
    keep = attention_mask[:, None, None, :].to(x.dtype)
    additive = (1.0 - keep) * torch.finfo(x.dtype).min
    for layer in self.encoder.layer:
      x = layer(x, additive)
    return x


class _MlmTransform(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.dense = nn.Linear(s.text_hidden, s.text_hidden)
    self.LayerNorm = nn.LayerNorm(s.text_hidden, eps=s.layer_norm_eps)

  def forward(self, x):
    return self.LayerNorm(F.gelu(self.dense(x)))


class _MlmPredictions(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    # Registered before the submodules so that it leads the state dict, as in transformers.
    self.bias = nn.Parameter(torch.zeros(s.vocab_size))
    self.transform = _MlmTransform(s)
    self.decoder = nn.Linear(s.text_hidden, s.vocab_size, bias=False)
    self.decoder.bias = self.bias

  def forward(self, x):
    return self.decoder(self.transform(x))


class _MlmHead(nn.Module):
  def __init__(self, s: AltaSizes):
    super().__init__()
    self.predictions = _MlmPredictions(s)


class AltaTextEncoder(nn.Module):
  """CXR-BERT-specialized with ALTA's adapters: BertForMaskedLM (bert + cls) and two projection heads."""

  def __init__(self, s: AltaSizes):
    super().__init__()
    self.bert = _BertBody(s)
    self.cls = _MlmHead(s)
    self.cls_projection_head = AltaProjectionHead(s.text_hidden, s.proj_dim)
    self.local_projection_head = AltaProjectionHead(s.text_hidden, s.proj_dim)
    # The MLM decoder shares the word embedding matrix (tie_word_embeddings).
    self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight


class TorchALTA(nn.Module):
  """ALTA's model in PyTorch, fp32, with ALTA's state-dict names (``alta_key_names``).

  ``TorchALTA(**ALTA_TINY_SIZES, seed=0)`` is a small random one; without
  arguments it has the published sizes (build it under ``torch.device("meta")``
  to look at names and shapes only).  ``load_state_dict`` takes an ALTA
  checkpoint's ``model`` entry (strict=False skips a ``position_ids`` buffer
  that transformers before 4.31 saved).
  """

  def __init__(self, sizes: Optional[AltaSizes] = None, *, seed: Optional[int] = None, **overrides):
    super().__init__()
    s = self.sizes = _alta_sizes(sizes, overrides)
    D, N = s.image_hidden, s.num_patches
    # Own parameters first, in ALTA's order, then the submodules in ALTA's order.
    self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
    # ALTA keeps this one in half precision (and never trains it); it is cast up where used.
    self.missing_token = nn.Parameter(torch.zeros(1, N, D, dtype=torch.float16))
    self.pos_embed = nn.Parameter(torch.zeros(1, N + 1, D), requires_grad=False)
    self.temporal_embedding = nn.Parameter(torch.zeros(1, 2, D))
    self.view_embedding = nn.Parameter(torch.zeros(1, 2, D))
    self.mask_token = nn.Parameter(torch.zeros(1, 1, s.decoder_embed_dim))
    self.decoder_pos_embed = nn.Parameter(torch.zeros(1, N + 1, s.decoder_embed_dim), requires_grad=False)
    init_scale = math.log(1 / 0.07)
    self.logit_scale = nn.Parameter(torch.full((), init_scale))
    self.logit_scale_local1 = nn.Parameter(torch.full((), init_scale))
    self.logit_scale_local2 = nn.Parameter(torch.full((), init_scale))
    self.logit_scale_local3 = nn.Parameter(torch.full((), init_scale))

    self.patch_embed = _AltaPatchEmbed(s)
    self.blocks = nn.ModuleList(
      [
        AltaBlock(D, s.image_heads, s.image_mlp_dim, s.image_norm_eps, s.image_bottleneck)
        for _ in range(s.image_layers)
      ]
    )
    self.norm = nn.LayerNorm(D, eps=s.image_norm_eps)
    self.bert_embed = nn.Linear(D, D)
    self.decoder_embed = nn.Linear(D, s.decoder_embed_dim)
    self.decoder_blocks = nn.ModuleList(
      [
        AltaBlock(s.decoder_embed_dim, s.decoder_num_heads, s.decoder_hidden, s.image_norm_eps)
        for _ in range(s.decoder_depth)
      ]
    )
    self.decoder_norm = nn.LayerNorm(s.decoder_embed_dim, eps=s.image_norm_eps)
    self.decoder_pred = nn.Linear(s.decoder_embed_dim, s.pred_dim)
    self.projection_head = AltaProjectionHead(D, s.proj_dim)
    self.local_projection_head = AltaProjectionHead(D, s.proj_dim)
    self.bert_encoder = AltaTextEncoder(s)
    self.reset_position_tables()
    if seed is not None:
      self.randomize_(seed)

  @torch.no_grad()
  def reset_position_tables(self):
    """Writes the fixed sin-cos tables into pos_embed and decoder_pos_embed."""
    if self.pos_embed.is_meta:
      return
    s = self.sizes
    for param, width in ((self.pos_embed, s.image_hidden), (self.decoder_pos_embed, s.decoder_embed_dim)):
      param.copy_(torch.from_numpy(alta_position_table(width, s.grid))[None])

  @torch.no_grad()
  def randomize_(self, seed: int) -> "TorchALTA":
    """Fills every tensor but the position tables with seeded, non-degenerate values.

    ALTA starts its adapters' D_fc2 at zero and LayerNorms at (1, 0), and never
    trains the missing-view token; such values would let a misplaced adapter,
    norm or token go unnoticed in a comparison, so nothing here is left at them.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = set()
    for module in self.modules():
      if isinstance(module, nn.LayerNorm):
        norms.add(id(module.weight))
    tables = {id(self.pos_embed), id(self.decoder_pos_embed)}
    tokens = {id(p) for p in (self.cls_token, self.missing_token, self.mask_token)}
    tokens |= {id(self.temporal_embedding), id(self.view_embedding)}
    # named_parameters lists a tied tensor once, so the MLM decoder keeps sharing its values.
    for _, param in self.named_parameters():
      if id(param) in tables or param.is_meta:
        continue
      noise = torch.randn(param.shape, generator=gen)
      if param.ndim == 0:
        value = math.log(1 / 0.07) + 0.5 * noise
      elif id(param) in norms:
        value = 1.0 + 0.2 * noise
      elif id(param) in tokens:
        value = 0.5 * noise
      elif param.ndim == 1:
        value = 0.1 * noise
      else:
        value = noise / math.sqrt(float(np.prod(param.shape[1:])))
      param.copy_(value.to(param.dtype))
    return self

  # ---- image

  def _cls_row(self, batch: int):
    return (self.cls_token + self.pos_embed[:, :1]).expand(batch, -1, -1)

  def _run_blocks(self, x):
    for block in self.blocks:
      x = block(x)
    return self.norm(x)

  def forward_img_hidden(self, x):
    """One view [B, 3, H, W] with the current-frontal embeddings -> normed tokens [B, 1 + N, D]."""
    tokens = self.patch_embed(x) + self.pos_embed[:, 1:]
    x = torch.cat([self._cls_row(x.shape[0]), tokens], dim=1)
    x = x + self.temporal_embedding[:, :1] + self.view_embedding[:, :1]
    return self._run_blocks(x)

  def forward_img_feature(self, x, t=None):
    """ALTA's single-image embedding: L2-normalised projection_head(CLS), [B, P].

    ``t`` is accepted and ignored, as ALTA's evaluation scripts pass one.
    """
    return F.normalize(self.projection_head(self.forward_img_hidden(x)[:, 0]), dim=-1)

  def encode_views(self, imgs, ids_keep=None):
    """Four views [B, 4, 3, H, W] -> dict(global, local, cls, hidden).

    View order: current frontal, current lateral, prior frontal, prior lateral;
    an all-zero image is a missing view and its patch tokens become
    missing_token's rows.  ``ids_keep`` [B, 4, K] picks the patches each view
    keeps (ALTA draws them at random; None keeps all in order).  Views do not
    attend to each other; global is the projected mean of all four CLS tokens,
    missing views included.
    """
    b, v = imgs.shape[:2]
    if v != 4:
      raise ValueError(f"ALTA takes four views, got {v}")
    flat = imgs.reshape(b * v, *imgs.shape[2:])
    missing = flat.sum(dim=(1, 2, 3)) == 0
    tokens = self.patch_embed(flat)
    tokens = torch.where(missing[:, None, None], self.missing_token.to(tokens.dtype), tokens)
    tokens = tokens + self.pos_embed[:, 1:]
    if ids_keep is not None:
      index = ids_keep.reshape(b * v, -1).long()
      tokens = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
    x = torch.cat([self._cls_row(b * v), tokens], dim=1)
    seq, width = x.shape[1], x.shape[2]
    view = self.view_embedding[0, list(ALTA_VIEW_TYPE)]
    time = self.temporal_embedding[0, list(ALTA_VIEW_TIME)]
    x = x.reshape(b, v, seq, width) + view[None, :, None] + time[None, :, None]
    hidden = self._run_blocks(x.reshape(b * v, seq, width)).reshape(b, v, seq, width)
    cls = hidden[:, :, 0]
    return {
      "global": F.normalize(self.projection_head(cls.mean(dim=1)), dim=-1),
      "local": self.local_projection_head(hidden[:, :, 1:].reshape(b, v * (seq - 1), width)),
      "cls": cls,
      "hidden": hidden,
    }

  # ---- text

  def encode_text(self, input_ids, attention_mask):
    """Token ids / mask [B, T] -> dict(global [B, P] normalised, local [B, T-1, P], hidden [B, T, h])."""
    enc = self.bert_encoder
    hidden = enc.bert(input_ids.long(), attention_mask)
    return {
      "global": F.normalize(enc.cls_projection_head(hidden[:, 0]), dim=-1),
      "local": enc.local_projection_head(hidden[:, 1:]),
      "hidden": hidden,
    }

  def forward_txt_feature_single(self, input_ids, attention_mask):
    return self.encode_text(input_ids, attention_mask)["global"]

  def forward_txt_feature(self, input_ids, attention_mask, normalize: bool = False):
    """Prompt sets [B, C, T] -> [B, C, P]; not normalised unless asked, as in ALTA's zero-shot scripts."""
    b, c, t = input_ids.shape
    hidden = self.bert_encoder.bert(input_ids.reshape(b * c, t).long(), attention_mask.reshape(b * c, t))
    emb = self.bert_encoder.cls_projection_head(hidden[:, 0])
    if normalize:
      emb = F.normalize(emb, dim=-1)
    return emb.reshape(b, c, -1)
