"""HuggingFace BERT weights (BERT, BioBERT, CXR-BERT, MiniLM naming) -> our text tower."""

from __future__ import annotations

from typing import Dict

import numpy as np

from clinvla_jax.convert import common

# Heads and buffers that BERT checkpoints carry and the text tower does not use.
IGNORED = (
  r"pooler\..*",
  r"cls\..*",
  r".*position_ids",
  r"embeddings\.position_ids",
  r"lm_head\..*",
  r"qa_outputs\..*",
  r"classifier\..*",
)


def _layer_norm_keys(prefix: str, state) -> tuple:
  # Checkpoints converted from the original TensorFlow BERT (BioBERT among
  # them) still say gamma / beta.
  if f"{prefix}.gamma" in state:
    return f"{prefix}.gamma", f"{prefix}.beta"
  return f"{prefix}.weight", f"{prefix}.bias"


def build_plan(params: dict, state) -> common.Plan:
  tower = params["text_tower"]
  num_layers = sum(1 for k in tower if k.startswith("layer_"))
  word = tower["embeddings"]["word_embeddings"]["embedding"]
  hidden = word.shape[1]
  heads = tower["layer_0"]["attention"]["query"]["kernel"].shape[1] if num_layers else 1
  head_dim = hidden // heads
  T = ("text_tower",)
  plan: common.Plan = {
    T + ("embeddings", "word_embeddings", "embedding"): ("embeddings.word_embeddings.weight", common.identity),
    T + ("embeddings", "position_embeddings", "embedding"): ("embeddings.position_embeddings.weight", common.identity),
    T + ("embeddings", "token_type_embeddings", "embedding"): (
      "embeddings.token_type_embeddings.weight",
      common.identity,
    ),
  }
  scale, bias = _layer_norm_keys("embeddings.LayerNorm", state)
  plan[T + ("embeddings", "LayerNorm", "scale")] = (scale, common.identity)
  plan[T + ("embeddings", "LayerNorm", "bias")] = (bias, common.identity)
  for i in range(num_layers):
    src = f"encoder.layer.{i}"
    ours = T + (f"layer_{i}",)
    for name in ("query", "key", "value"):
      plan[ours + ("attention", name, "kernel")] = (
        f"{src}.attention.self.{name}.weight",
        common.linear_kernel(heads, head_dim),
      )
      plan[ours + ("attention", name, "bias")] = (
        f"{src}.attention.self.{name}.bias",
        common.reshape_to(heads, head_dim),
      )
    plan[ours + ("attention", "output", "kernel")] = (
      f"{src}.attention.output.dense.weight",
      common.linear_kernel_in(heads, head_dim),
    )
    plan[ours + ("attention", "output", "bias")] = (f"{src}.attention.output.dense.bias", common.identity)
    for norm_ours, norm_src in (
      ("attention_norm", f"{src}.attention.output.LayerNorm"),
      ("output_norm", f"{src}.output.LayerNorm"),
    ):
      scale, bias = _layer_norm_keys(norm_src, state)
      plan[ours + (norm_ours, "scale")] = (scale, common.identity)
      plan[ours + (norm_ours, "bias")] = (bias, common.identity)
    for dense_ours, dense_src in (("intermediate", f"{src}.intermediate.dense"), ("output", f"{src}.output.dense")):
      plan[ours + (dense_ours, "kernel")] = (f"{dense_src}.weight", common.linear_kernel())
      plan[ours + (dense_ours, "bias")] = (f"{dense_src}.bias", common.identity)
  return plan


def keep_first_positions(value: np.ndarray, target) -> np.ndarray:
  # BERT checkpoints carry 512 positions; a shorter model keeps the first ones.
  if value.ndim == 2 and value.shape[1] == target[1] and value.shape[0] > target[0]:
    return value[: target[0]]
  return value


def load_text_weights(variables: Dict, source) -> Dict:
  """Returns ``variables`` with the text backbone replaced by an HF BERT checkpoint.

  ``source``: a folder (model.safetensors / pytorch_model.bin), a file, or a
  state dict.  The text tower may be in either block layout (``scan_layers``).  Adapters, heads and everything outside the text backbone keep
  their current values.  Missing backbone weights, unknown keys (other than
  the pooler / MLM heads) and shape mismatches raise ``CheckpointError``.
  """
  state = common.read_state_dict(source)
  state = common.strip_prefixes(state, ("module.", "bert.", "model."))
  new_params = common.apply_plan_any_layout(
    variables["params"],
    "text_tower",
    lambda params: build_plan(params, state),
    state,
    ignore=IGNORED,
    what="BERT checkpoint",
    shape_fixers={"embeddings.position_embeddings.weight": keep_first_positions},
  )
  return {**variables, "params": new_params}
