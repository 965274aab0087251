"""Analytical FLOP counts.

Convention: 2 FLOPs per multiply-accumulate; matrix multiplications only
(projections, MLPs, adapters, heads, and the two attention matmuls QK^T and
AV); softmax, LayerNorm, GELU and other element-wise work are not counted.
Training-step FLOPs ~= 3x forward for the trainable path; with a frozen
backbone XLA skips weight gradients, so the backward costs ~1x forward
(activation gradients only) plus the adapters' weight gradients.
"""

from __future__ import annotations

from clinvla_jax.model.clinvla import ClinVLAConfig


def transformer_layer_flops(seq: int, width: int, mlp: int, adapters: int = 0, adapter_dim: int = 0) -> int:
  """Forward FLOPs of one transformer layer on one sequence of ``seq`` tokens."""
  projections = 2 * seq * width * (4 * width)  # q, k, v, output
  attention = 2 * 2 * seq * seq * width  # QK^T and AV
  feed_forward = 2 * 2 * seq * width * mlp
  adapter = adapters * 2 * 2 * seq * width * adapter_dim
  return projections + attention + feed_forward + adapter


def head_flops(width: int, proj: int, rows: int) -> int:
  return 2 * rows * (width * width + width * proj)


def vit_forward_flops(cfg: ClinVLAConfig, tokens: int) -> int:
  """One view through the image tower (tokens includes CLS) plus patch embedding."""
  c = cfg.image
  per_layer = transformer_layer_flops(tokens, c.hidden_size, c.mlp_dim, 1 if c.adapter_dim else 0, c.adapter_dim)
  patch_embed = 2 * (tokens - 1) * c.patch_size * c.patch_size * c.channels * c.hidden_size
  return c.num_layers * per_layer + patch_embed


def bert_forward_flops(cfg: ClinVLAConfig, tokens: int) -> int:
  c = cfg.text
  adapters = 2 if c.use_adapters else 0
  per_layer = transformer_layer_flops(tokens, c.hidden_size, c.mlp_dim, adapters, c.adapter_dim)
  invertible = 2 * 2 * 2 * tokens * (c.hidden_size // 2) * (c.hidden_size // 4) if c.invertible_adapter else 0
  return c.num_layers * per_layer + invertible


def forward_flops_per_study(cfg: ClinVLAConfig, *, num_views: int, kept_patches: int, text_tokens: int) -> dict:
  """Forward FLOPs of one study (image views + report), by part."""
  image = num_views * vit_forward_flops(cfg, 1 + kept_patches)
  text = bert_forward_flops(cfg, text_tokens)
  heads = head_flops(cfg.image.hidden_size, cfg.proj_dim, 1 + num_views * kept_patches) + head_flops(
    cfg.text.hidden_size, cfg.proj_dim, 1 + text_tokens
  )
  return {"image": image, "text": text, "heads": heads, "total": image + text + heads}


def train_forward_flops(cfg: ClinVLAConfig, *, kept_patches: int) -> dict:
  """Forward FLOPs of one training study: every used view with ``kept_patches`` patches (the data's masking)."""
  return forward_flops_per_study(
    cfg, num_views=len(cfg.view_slots), kept_patches=kept_patches, text_tokens=cfg.text.max_len
  )


def eval_forward_flops(cfg: ClinVLAConfig) -> dict:
  return forward_flops_per_study(cfg, num_views=1, kept_patches=cfg.image.num_patches, text_tokens=cfg.text.max_len)


def train_step_flops_per_study(cfg: ClinVLAConfig, *, kept_patches: int, frozen_backbone: bool = True) -> int:
  """Approximate forward + backward FLOPs of one study in a train step (``kept_patches`` per view)."""
  fwd = train_forward_flops(cfg, kept_patches=kept_patches)["total"]
  return (2 if frozen_backbone else 3) * fwd
