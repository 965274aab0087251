"""The pretrained weights a config names (``config.init``), applied to freshly initialised variables."""

from __future__ import annotations

from typing import Dict

from absl import logging

from clinvla_jax.convert.alta import load_alta
from clinvla_jax.convert.hf_bert import load_text_weights
from clinvla_jax.convert.timm_vit import load_image_weights

INIT_FIELDS = ("alta_weights", "text_weights", "image_weights")


def wants_pretrained(config) -> bool:
  init = config.get("init") or {}
  return any(init.get(field) for field in INIT_FIELDS)


def load_configured_weights(variables: Dict, config) -> Dict:
  """``variables`` with ``config.init``'s checkpoints loaded: a whole ALTA model first, then the single towers.

  A tower checkpoint given beside ``alta_weights`` replaces that tower's
  backbone on top of the ALTA model.
  """
  init = config.get("init") or {}
  if init.get("alta_weights"):
    variables = load_alta(variables, init.alta_weights, config=config)
    logging.info("ALTA model loaded from %s", init.alta_weights)
  if init.get("text_weights"):
    variables = load_text_weights(variables, init.text_weights)
    logging.info("text backbone loaded from %s", init.text_weights)
  if init.get("image_weights"):
    variables = load_image_weights(variables, init.image_weights, config=config)
    logging.info("image backbone loaded from %s", init.image_weights)
  return variables
