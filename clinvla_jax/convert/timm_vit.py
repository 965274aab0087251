"""timm / MAE / MRM ViT weights (timm naming) -> our image tower."""

from __future__ import annotations

from typing import Dict

import numpy as np
from absl import logging

from clinvla_jax.convert import common
from clinvla_jax.model.vit import sincos_2d_position_embedding

# Pretraining heads and classifier weights that the image tower does not use:
# MAE's decoder and mask token, MRM's text branch, timm's classifier head.
IGNORED = (
  r"decoder.*",
  r"mask_token",
  r"head\..*",
  r"fc_norm\..*",
  r"bert.*",
  r"cls\..*",
  r".*position_ids",
  r"text_.*",
  r"mlm.*",
  r"pooler.*",
)


def patch_kernel(weight: np.ndarray) -> np.ndarray:
  """Conv weight [D, C, p, p] -> matmul kernel [p*p*C, D] for (row, col, channel) patch vectors."""
  d, c, ph, pw = weight.shape
  return weight.transpose(2, 3, 1, 0).reshape(ph * pw * c, d)


def build_plan(params: dict) -> common.Plan:
  tower = params["image_tower"]
  num_layers = sum(1 for k in tower if k.startswith("blocks_"))
  hidden = tower["cls_token"].shape[-1]
  heads = tower["blocks_0"]["attn"]["qkv"]["kernel"].shape[2] if num_layers else 1
  head_dim = hidden // heads
  I = ("image_tower",)
  plan: common.Plan = {
    I + ("cls_token",): ("cls_token", lambda w: w.reshape(1, -1)),
    I + ("patch_embed_kernel",): ("patch_embed.proj.weight", patch_kernel),
    I + ("patch_embed_bias",): ("patch_embed.proj.bias", common.identity),
    I + ("norm", "scale"): ("norm.weight", common.identity),
    I + ("norm", "bias"): ("norm.bias", common.identity),
  }
  if "pos_embedding" in tower:
    plan[I + ("pos_embedding",)] = ("pos_embed", lambda w: w.reshape(w.shape[-2], w.shape[-1]))
  for i in range(num_layers):
    src = f"blocks.{i}"
    ours = I + (f"blocks_{i}",)
    for norm in ("norm1", "norm2"):
      plan[ours + (norm, "scale")] = (f"{src}.{norm}.weight", common.identity)
      plan[ours + (norm, "bias")] = (f"{src}.{norm}.bias", common.identity)
    plan[ours + ("attn", "qkv", "kernel")] = (f"{src}.attn.qkv.weight", common.linear_kernel(3, heads, head_dim))
    plan[ours + ("attn", "qkv", "bias")] = (f"{src}.attn.qkv.bias", common.reshape_to(3, heads, head_dim))
    plan[ours + ("attn", "proj", "kernel")] = (f"{src}.attn.proj.weight", common.linear_kernel_in(heads, head_dim))
    plan[ours + ("attn", "proj", "bias")] = (f"{src}.attn.proj.bias", common.identity)
    for fc in ("fc1", "fc2"):
      plan[ours + ("mlp", fc, "kernel")] = (f"{src}.mlp.{fc}.weight", common.linear_kernel())
      plan[ours + ("mlp", fc, "bias")] = (f"{src}.mlp.{fc}.bias", common.identity)
  return plan


def _check_fixed_position_embedding(state, tower) -> None:
  if "pos_embed" not in state:
    return
  pos = state["pos_embed"].reshape(-1, state["pos_embed"].shape[-1])
  grid = int(round((pos.shape[0] - 1) ** 0.5))
  if grid * grid + 1 != pos.shape[0] or pos.shape[1] != tower["cls_token"].shape[-1]:
    return
  diff = float(np.max(np.abs(pos - sincos_2d_position_embedding(grid, pos.shape[1]))))
  if diff > 1e-3:
    logging.warning(
      "the checkpoint's pos_embed differs from the fixed sin-cos table by up to %.3g; "
      "set model.image.pos_embed='learned' to load it instead",
      diff,
    )


def load_image_weights(variables: Dict, source) -> Dict:
  """Returns ``variables`` with the ViT backbone replaced by a timm-named state dict.

  MAE / MRM checkpoints (``{"model": state_dict}``) load as well; their decoder
  and text parts are ignored.  With ``pos_embed="sincos"`` the checkpoint's
  ``pos_embed`` is not loaded (the table is fixed) but compared, with a
  warning if it is not the same sin-cos table.  Adapters, view / time /
  missing embeddings and heads keep their current values.  The image tower
  may be in either block layout (``scan_layers``).
  """
  state = common.read_state_dict(source)
  state = common.strip_prefixes(state, ("module.", "visual.", "encoder.", "image_encoder.", "vit."))
  params = variables["params"]
  tower = params["image_tower"]
  ignore = IGNORED
  if "pos_embedding" not in tower:
    _check_fixed_position_embedding(state, tower)
    ignore = IGNORED + (r"pos_embed",)
  new_params = common.apply_plan_any_layout(
    params, "image_tower", build_plan, state, ignore=ignore, what="ViT checkpoint"
  )
  return {**variables, "params": new_params}
