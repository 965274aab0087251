"""`--mode=summary`: parameters per part, trainable share and analytical FLOPs.

Built from ``jax.eval_shape``: nothing full-size is allocated.
"""

from __future__ import annotations

import re
from typing import Dict, List, Tuple

import numpy as np

from clinvla_jax import api, optim
from clinvla_jax.model import flops

# Paper, Table 7 (ClinVLA row) and §1.
PAPER_PARAMS_M = 112.3
PAPER_TRAINABLE_PCT = 12.0
PAPER_FLOPS_PER_SAMPLE = 2.8e12

# Ordered: first match names the part.  Blocks are "layer_3" / "blocks_3" in the
# loop layout and "layer" / "blocks" (stacked) with scan_layers.
PARTS: Tuple[Tuple[str, str], ...] = (
  ("language adapters", r"text_tower/layer(_\d+)?/language_adapter/.*"),
  ("task adapters", r"text_tower/layer(_\d+)?/task_adapter/.*"),
  ("text adapters (ALTA)", r"text_tower/layer(_\d+)?/(attn|mlp)_adapter/.*"),
  ("invertible adapter", r"text_tower/invertible_adapter/.*"),
  ("image adapters", r"image_tower/blocks(_\d+)?/((attn|mlp)_)?adapter/.*"),
  ("view/time/CLS/missing embeddings", r"image_tower/(cls_token|view_embed|time_embed|missing_token|pos_embedding)"),
  ("heads + loss scales", r"(image|text)_(global|local)_head/.*|logit_scale|logit_bias|local_log_temperatures"),
  ("image tower (ViT backbone)", r"image_tower/.*"),
  ("text tower (BERT backbone)", r"text_tower/.*"),
)


def parameter_table(config) -> Dict[str, Dict[str, int]]:
  """{part: {"total": n, "trainable": n}} plus a "total" row, from abstract shapes."""
  abstract = api.abstract_params(config, boxed=False)["params"]
  rules = list(config.optim.param_groups)
  table: Dict[str, Dict[str, int]] = {name: {"total": 0, "trainable": 0} for name, _ in PARTS}
  for path, leaf in optim.flat_paths(abstract).items():
    size = int(np.prod(leaf.shape))
    part = next((name for name, pattern in PARTS if re.fullmatch(pattern, path)), None)
    if part is None:
      raise ValueError(f"parameter {path} belongs to no summary part")
    trainable = optim.group_of(path, rules) != optim.FROZEN
    table[part]["total"] += size
    table[part]["trainable"] += size if trainable else 0
  table["total"] = {k: sum(row[k] for row in table.values()) for k in ("total", "trainable")}
  return table


def trainable_percent(table) -> float:
  return 100.0 * table["total"]["trainable"] / table["total"]["total"]


def summary_lines(config) -> List[str]:
  from clinvla_jax.model.clinvla import ClinVLAConfig

  mcfg = ClinVLAConfig.from_config(config.model)
  table = parameter_table(config)
  total = table["total"]["total"]
  trainable = table["total"]["trainable"]
  lines = ["ClinVLA parameters", f"{'part':36s} {'params':>14s} {'trainable':>14s} {'% of model':>11s}"]
  for name, row in table.items():
    if not row["total"] and name != "total":  # a part this architecture does not have
      continue
    if name == "total":
      lines.append("-" * 78)
    lines.append(f"{name:36s} {row['total']:14,d} {row['trainable']:14,d} {100 * row['total'] / total:10.2f}%")
  lines.append(
    f"trainable: {trainable:,d} of {total:,d} = {trainable_percent(table):.2f} % "
    f"(paper: {PAPER_TRAINABLE_PCT:.0f} % of {PAPER_PARAMS_M} M)"
  )
  # AdamW keeps two fp32 moments per trainable value; the frozen backbone is not saved.
  ckpt_mib = 3 * 4 * trainable / 2**20
  lines.append(
    f"adapter-only checkpoint (trainable params + AdamW moments, fp32): {ckpt_mib:.1f} MiB; "
    f"full fp32 parameters: {4 * total / 2**20:.1f} MiB ({100 * ckpt_mib / (4 * total / 2**20):.1f} %)"
  )
  kept = flops_kept(config)
  train = flops.train_forward_flops(mcfg, kept_patches=kept)
  evaluation = flops.eval_forward_flops(mcfg)
  lines += [
    "",
    "Analytical forward FLOPs per study (2 FLOPs per multiply-add; matmuls incl. attention; element-wise ops excluded)",
    f"  training  ({len(mcfg.view_slots)} views x {kept} kept patches, {mcfg.text.max_len} tokens): "
    f"{train['total']:.3e}  (image {train['image']:.3e}, text {train['text']:.3e}, heads {train['heads']:.3e})",
    f"  evaluation (1 frontal view x {mcfg.image.num_patches} patches, {mcfg.text.max_len} tokens): "
    f"{evaluation['total']:.3e}  (image {evaluation['image']:.3e}, text {evaluation['text']:.3e})",
    f"  train step (forward + backward, frozen backbone) ~ {flops.train_step_flops_per_study(mcfg, kept_patches=kept):.3e}",
    f"  paper Table 7: {PAPER_FLOPS_PER_SAMPLE:.1e} FLOPs/sample, {PAPER_PARAMS_M} M parameters "
    "(convention not stated)",
  ]
  return lines


def flops_kept(config) -> int:
  """Patches kept per training view: the data's masking of the model's patch grid."""
  from clinvla_jax.data.records import num_kept_patches

  return num_kept_patches(config.data.mask_ratio, api.model_config(config).image.num_patches)
