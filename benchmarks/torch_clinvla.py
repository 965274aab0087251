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
"""

from __future__ import annotations

import re
from typing import Dict, Sequence, Tuple

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
