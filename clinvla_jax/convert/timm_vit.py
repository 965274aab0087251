"""timm / MAE / MRM ViT weights (timm naming) -> our image tower."""

from __future__ import annotations

import re
from typing import Dict

import numpy as np
from absl import logging

from clinvla_jax.convert import common
from clinvla_jax.model import vit

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


def identify_position_table(table: np.ndarray, atol: float = 1e-5) -> str:
  """The fixed ``pos_embed`` name whose table ``table`` [1 + N, D] equals within ``atol``, or ""."""
  table = np.asarray(table, np.float32).reshape(-1, table.shape[-1])
  grid = int(round((table.shape[0] - 1) ** 0.5))
  if grid * grid + 1 != table.shape[0] or table.shape[1] % 4:
    return ""
  for name in vit.FIXED_POS_EMBEDS:
    if np.allclose(table, vit.fixed_position_table(name, grid, table.shape[1]), rtol=0.0, atol=atol):
      return name
  return ""


def _model_pos_embed(config) -> str:
  if config is None:
    return ""
  from clinvla_jax import api  # pylint: disable=g-import-not-at-top

  return api.model_config(config).image.pos_embed


def position_table_plan(state, tower, key: str = "pos_embed", config=None) -> tuple:
  """How a checkpoint's position table ``state[key]`` enters the image tower: (plan entries, ignore patterns).

  The checkpoint's own table is what the model must run with.  A tower with a
  ``pos_embedding`` parameter (``pos_embed="learned"``) gets it loaded (frozen
  by the default parameter groups, as in MAE / MRM / ALTA).  A tower with a
  fixed table is checked against it: the table ``config`` names must equal the
  checkpoint's; without ``config`` the table is identified and logged.  A grid
  that does not fit, or a table that no fixed name reproduces, is a
  ``CheckpointError`` that says which setting loads it.
  """
  if key not in state:
    return {}, ()
  table = np.asarray(state[key])
  table2d = table.reshape(-1, table.shape[-1])
  width = tower["cls_token"].shape[-1]
  if "pos_embedding" in tower:
    expected = tuple(tower["pos_embedding"].shape)
    if tuple(table2d.shape) != expected:
      raise common.CheckpointError(
        f"the checkpoint's {key} {tuple(table.shape)} does not fit the image tower's position table {expected}: "
        f"{table2d.shape[0] - 1} positions (grid {int(round((table2d.shape[0] - 1) ** 0.5))}) and width "
        f"{table2d.shape[1]} against {expected[0] - 1} and {expected[1]}; set model.image.image_size / "
        "patch_size / hidden_size to the checkpoint's"
      )
    return {("image_tower", "pos_embedding"): (key, lambda w: w.reshape(w.shape[-2], w.shape[-1]))}, ()
  found = identify_position_table(table2d)
  wanted = _model_pos_embed(config)
  if table2d.shape[1] != width:
    raise common.CheckpointError(
      f"the checkpoint's {key} {tuple(table.shape)} has width {table2d.shape[1]}, the image tower {width}"
    )
  if not found:
    raise common.CheckpointError(
      f"the checkpoint's {key} {tuple(table.shape)} is none of the fixed tables {vit.FIXED_POS_EMBEDS}; "
      "set model.image.pos_embed='learned' to load it as it is"
    )
  if wanted and wanted != found:
    raise common.CheckpointError(
      f"the checkpoint's {key} is the {found!r} table but the model uses model.image.pos_embed={wanted!r}; "
      f"set model.image.pos_embed={found!r} (or 'learned' to load the table as a frozen parameter)"
    )
  if not wanted:
    logging.info("the checkpoint's %s is the %r table; the model must use model.image.pos_embed=%r", key, found, found)
  return {}, (re.escape(key),)


def load_image_weights(variables: Dict, source, *, config=None) -> Dict:
  """Returns ``variables`` with the ViT backbone replaced by a timm-named state dict.

  MAE / MRM checkpoints (``{"model": state_dict}``) load as well; their decoder
  and text parts are ignored.  The checkpoint's ``pos_embed`` is loaded into a
  ``pos_embed="learned"`` tower, and must equal a fixed tower's table
  (``position_table_plan``; pass the run's ``config`` to check it against the
  configured one).  Adapters, view / time / missing embeddings and heads keep
  their current values.  The image tower may be in either block layout
  (``scan_layers``).
  """
  state = common.read_state_dict(source)
  state = common.strip_prefixes(state, ("module.", "visual.", "encoder.", "image_encoder.", "vit."))
  params = variables["params"]
  tower = params["image_tower"]
  pos_plan, pos_ignore = position_table_plan(state, tower, config=config)

  def plan(p):
    out = build_plan(p)
    out.pop(("image_tower", "pos_embedding"), None)
    out.update(pos_plan)
    return out

  new_params = common.apply_plan_any_layout(
    params, "image_tower", plan, state, ignore=IGNORED + pos_ignore, what="ViT checkpoint"
  )
  return {**variables, "params": new_params}
