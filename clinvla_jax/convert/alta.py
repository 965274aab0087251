"""ALTA checkpoints (the PyTorch peer's ``ALTA.pth``) -> a model built with ``configs/alta.py``.

ALTA (Lian et al., IEEE TMI 2025) keeps both towers in one state dict: the
ViT under timm names at the top level (plus its two adapters per block, the
per-patch missing token, view / time embeddings, two projection heads and
four logit scales), CXR-BERT under ``bert_encoder.`` (HF BERT names, two
adapters per layer, two projection heads).  Every tensor ALTA uses at
inference is mapped; its pretraining-only tensors (the MAE decoder and mask
token, the image-to-text ``bert_embed`` and the MLM head) are skipped by the
named list ``PRETRAINING_ONLY``; anything else unknown, missing or misshapen
is a ``CheckpointError`` naming it.

The model must have ALTA's switches (``configs/alta.py``): image and text
``adapter_style="alta"``, ``head_style="alta"``, ``missing_view_token="per_patch"``,
``learn_local_temperatures=True`` (ALTA learns its three word-region
temperatures) and the checkpoint's position table (``sincos_mrm``, or
``learned`` to hold it as a parameter).
"""

from __future__ import annotations

import re
from typing import Dict, Tuple

import numpy as np
from absl import logging

from clinvla_jax.convert import common, hf_bert, timm_vit

TEXT_PREFIX = "bert_encoder."
TEXT_BACKBONE_PREFIX = TEXT_PREFIX + "bert."

# Tensors of ALTA's pretraining objectives (MAE reconstruction, image-conditioned MLM) that inference never reads.
PRETRAINING_ONLY = (
  r"decoder_embed\..*",
  r"mask_token",
  r"decoder_pos_embed",
  r"decoder_blocks\..*",
  r"decoder_norm\..*",
  r"decoder_pred\..*",
  r"bert_embed\..*",
  r"bert_encoder\.cls\.predictions\..*",
)
# Buffers that some transformers versions save with BERT; constants, never weights.
BUFFERS = (r"bert_encoder\.bert\.embeddings\.(position_ids|token_type_ids)",)

# ALTA's local temperatures, in GLoRIA's order (temp1, temp2, temp3); stored as log-scales like ours.
LOCAL_SCALES = ("logit_scale_local1", "logit_scale_local2", "logit_scale_local3")
STACKED_LOCAL_SCALES = "logit_scale_local(1,2,3)"

# (our head, ALTA's head) of each tower.
IMAGE_HEADS = (("image_global_head", "projection_head"), ("image_local_head", "local_projection_head"))
TEXT_HEADS = (
  ("text_global_head", TEXT_PREFIX + "cls_projection_head"),
  ("text_local_head", TEXT_PREFIX + "local_projection_head"),
)
_HEAD_LAYERS = (("dense1", "dense_to_hidden"), ("dense2", "dense_to_output"))


def _linear(ours: Tuple[str, ...], theirs: str) -> common.Plan:
  return {
    ours + ("kernel",): (f"{theirs}.weight", common.linear_kernel()),
    ours + ("bias",): (f"{theirs}.bias", common.identity),
  }


def _adapter(ours: Tuple[str, ...], theirs: str) -> common.Plan:
  return {**_linear(ours + ("down",), f"{theirs}.D_fc1"), **_linear(ours + ("up",), f"{theirs}.D_fc2")}


def _head(ours: str, theirs: str) -> common.Plan:
  plan: common.Plan = {}
  for our_layer, their_layer in _HEAD_LAYERS:
    plan.update(_linear((ours, our_layer), f"{theirs}.{their_layer}"))
  plan[(ours, "norm", "scale")] = (f"{theirs}.LayerNorm.weight", common.identity)
  plan[(ours, "norm", "bias")] = (f"{theirs}.LayerNorm.bias", common.identity)
  return plan


def _num_blocks(tower: dict, name: str) -> int:
  return sum(1 for k in tower if re.fullmatch(rf"{name}_\d+", str(k)))


def build_plan(params: dict, state) -> common.Plan:
  """Our flat path -> (ALTA key, transform), for a tree in the loop layout."""
  plan: common.Plan = dict(timm_vit.build_plan(params))
  plan.pop(("image_tower", "pos_embedding"), None)  # position_table_plan decides
  image = params["image_tower"]
  for i in range(_num_blocks(image, "blocks")):
    for name in ("attn_adapter", "mlp_adapter"):
      plan.update(_adapter(("image_tower", f"blocks_{i}", name), f"blocks.{i}.{name}"))
  plan[("image_tower", "missing_token")] = ("missing_token", lambda w: w.reshape(w.shape[-2], w.shape[-1]))
  plan[("image_tower", "view_embed")] = ("view_embedding", lambda w: w.reshape(w.shape[-2], w.shape[-1]))
  plan[("image_tower", "time_embed")] = ("temporal_embedding", lambda w: w.reshape(w.shape[-2], w.shape[-1]))

  text_state = {k[len(TEXT_BACKBONE_PREFIX) :]: v for k, v in state.items() if k.startswith(TEXT_BACKBONE_PREFIX)}
  for ours, (key, transform) in hf_bert.build_plan(params, text_state).items():
    plan[ours] = (TEXT_BACKBONE_PREFIX + key, transform)
  text = params["text_tower"]
  for i in range(_num_blocks(text, "layer")):
    for name in ("attn_adapter", "mlp_adapter"):
      plan.update(_adapter(("text_tower", f"layer_{i}", name), f"{TEXT_BACKBONE_PREFIX}encoder.layer.{i}.{name}"))

  for ours, theirs in IMAGE_HEADS + TEXT_HEADS:
    plan.update(_head(ours, theirs))
  plan[("logit_scale",)] = ("logit_scale", lambda w: np.asarray(w).reshape(()))
  plan[("local_log_temperatures",)] = (STACKED_LOCAL_SCALES, common.identity)
  return {ours: entry for ours, entry in plan.items() if _exists(params, ours)}


def _exists(params: dict, path: Tuple[str, ...]) -> bool:
  node = params
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return False
    node = node[key]
  return True


def _check_model(params: dict, state) -> None:
  """Clear errors for a model built without ALTA's switches, before the key-by-key report."""
  problems = []
  image = params["image_tower"]
  if "blocks_0" in image and "attn_adapter" not in image["blocks_0"]:
    problems.append("model.image.adapter_style='alta' (ALTA's two adapters per block)")
  text = params["text_tower"]
  if "layer_0" in text and "attn_adapter" not in text["layer_0"]:
    problems.append("model.text.adapter_style='alta' and model.text.use_adapters=True")
  if "invertible_adapter" in text:
    problems.append("model.text.invertible_adapter=False (ALTA has none)")
  if "missing_token" in state and image["missing_token"].ndim != 2:
    problems.append("model.image.missing_view_token='per_patch' (ALTA keeps one missing token per patch)")
  # ALTA's heads are h -> P -> P (a square output layer); ClinVLA's are h -> h -> P.
  out_layer = params["image_global_head"]["dense2"]["kernel"]
  if out_layer.shape[0] != out_layer.shape[1]:
    problems.append("model.head_style='alta' (ALTA's heads project to P first)")
  if any(k in state for k in LOCAL_SCALES) and "local_log_temperatures" not in params:
    problems.append("model.learn_local_temperatures=True (ALTA learns its three local temperatures)")
  if problems:
    raise common.CheckpointError(
      "cannot load the ALTA checkpoint into this model; build it with configs/alta.py or set: " + "; ".join(problems)
    )


def _stack_local_scales(state) -> dict:
  present = [k for k in LOCAL_SCALES if k in state]
  if not present:
    return dict(state)
  if len(present) != len(LOCAL_SCALES):
    raise common.CheckpointError(
      f"the ALTA checkpoint holds {present} but not {[k for k in LOCAL_SCALES if k not in state]}"
    )
  out = {k: v for k, v in state.items() if k not in LOCAL_SCALES}
  out[STACKED_LOCAL_SCALES] = np.stack([np.asarray(state[k], np.float32).reshape(()) for k in LOCAL_SCALES])
  return out


def load_alta(variables: Dict, source, *, config=None) -> Dict:
  """Returns ``variables`` with every weight ALTA uses at inference taken from an ALTA checkpoint.

  ``source``: ALTA's ``.pth`` (with or without its ``"model"`` wrapper), a
  ``.safetensors`` file, or an in-memory state dict.  ``variables``: a model
  built with ``configs/alta.py`` (any sizes set by the usual ``model.*``
  overrides), in either block layout.  ``config``: the run's config, to check
  the checkpoint's position table against ``model.image.pos_embed``.
  """
  state = common.read_state_dict(source)
  state = common.strip_prefixes(state, ("module.",))
  params = variables["params"]
  from clinvla_jax.convert import layout  # pylint: disable=g-import-not-at-top

  loop_params = layout.unstack_layers(params, ["image_tower", "text_tower"])
  _check_model(loop_params, state)
  pos_plan, pos_ignore = timm_vit.position_table_plan(state, loop_params["image_tower"], config=config)
  skipped = sorted(k for k in state if any(re.fullmatch(p, k) for p in PRETRAINING_ONLY))
  if skipped:
    logging.info(
      "ALTA checkpoint: skipping %d pretraining-only tensors (%s)",
      len(skipped),
      ", ".join(sorted({p.replace("\\", "").replace(".*", "*") for p in PRETRAINING_ONLY})),
    )
  state = _stack_local_scales(state)

  def plan(p):
    out = build_plan(p, state)
    out.update(pos_plan)
    return out

  new_params = common.apply_plan_any_layout(
    params,
    ("image_tower", "text_tower"),
    plan,
    state,
    ignore=PRETRAINING_ONLY + BUFFERS + pos_ignore,
    what="ALTA checkpoint",
    shape_fixers={TEXT_BACKBONE_PREFIX + "embeddings.position_embeddings.weight": hf_bert.keep_first_positions},
  )
  return {**variables, "params": new_params}
