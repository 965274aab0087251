"""The functional entry points researchers script against.

    cfg = load_config("configs/base.py", overrides={...})
    variables = init_params(cfg, jax.random.key(0))
    out = encode_text(cfg, variables, input_ids, attention_mask)
    out = encode_images(cfg, variables, images, view_valid)

Functions are jitted once per model configuration.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clinvla_jax.data import masking
from clinvla_jax.model.clinvla import ClinVLA, ClinVLAConfig


def model_config(cfg) -> ClinVLAConfig:
  """ClinVLAConfig from a full config, a ``model`` sub-config, or itself.

  Only a full config carries the loss choice, and with it the sigmoid loss's
  logit bias: build models that are trained or restored from the full config.
  """
  if isinstance(cfg, ClinVLAConfig):
    return cfg
  if "model" in cfg:
    return ClinVLAConfig.from_config(cfg.model, cfg.get("loss"))
  return ClinVLAConfig.from_config(cfg)


def build_model(cfg) -> ClinVLA:
  return ClinVLA(model_config(cfg))


def dummy_inputs(mcfg: ClinVLAConfig, batch: int = 1, num_kept: int = 49):
  patch_dim = mcfg.image.patch_size**2
  return dict(
    patches=jnp.zeros((batch, 4, num_kept, patch_dim), jnp.uint8),
    patch_idx=jnp.tile(jnp.arange(num_kept, dtype=jnp.int32), (batch, 4, 1)),
    view_valid=jnp.ones((batch, 4), bool),
    input_ids=jnp.zeros((batch, mcfg.text.max_len), jnp.int32),
    attention_mask=jnp.ones((batch, mcfg.text.max_len), jnp.int32),
  )


@functools.lru_cache(maxsize=None)
def init_fn(mcfg: ClinVLAConfig, boxed: bool = True):
  """key -> the model's variables; ``boxed`` keeps the logical axis names (nn.Partitioned).

  One function per config (cached), so jitting it twice reuses the trace.
  """
  model = ClinVLA(mcfg)

  def init(key):
    variables = model.init({"params": key}, **dummy_inputs(mcfg))
    return variables if boxed else nn.meta.unbox(variables)

  return init


def init_params(cfg, key: jax.Array) -> dict:
  """Random initialisation: {"params": ...} of plain arrays in the loadable layout."""
  return jax.jit(init_fn(model_config(cfg), False))(key)


def abstract_params(cfg, boxed: bool = True):
  """Shapes (and, boxed, logical axis names) of the variables without allocating them."""
  return jax.eval_shape(init_fn(model_config(cfg), boxed), jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _text_fn(mcfg: ClinVLAConfig):
  model = ClinVLA(mcfg)
  return jax.jit(lambda v, ids, mask: model.apply(v, ids, mask, method=ClinVLA.encode_text))


@functools.lru_cache(maxsize=None)
def _image_fn(mcfg: ClinVLAConfig, view_slots: Optional[Tuple[int, ...]]):
  model = ClinVLA(mcfg)
  return jax.jit(lambda v, p, idx, valid: model.apply(v, p, idx, valid, view_slots, method=ClinVLA.encode_image))


def encode_text(cfg, variables, input_ids, attention_mask) -> dict:
  """{"global": [B, P], "local": [B, T, P], "local_mask": [B, T], "hidden": [B, T, h]}."""
  return _text_fn(model_config(cfg))(
    variables, jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
  )


def patchify(images, patch_size: int):
  """[..., H, W] or [..., H, W, C] -> ([..., N, p*p*C], row-major patch index [N]).

  A trailing axis of at most 4 that differs from the width is taken as channels.
  """
  images = jnp.asarray(images)
  channels_last = images.ndim >= 3 and images.shape[-1] != images.shape[-2] and images.shape[-1] <= 4
  patches = masking.patchify(images, patch_size, channels_last=channels_last)
  return patches, jnp.arange(patches.shape[-2], dtype=jnp.int32)


def encode_images(
  cfg, variables, images, view_valid=None, patch_idx=None, view_slots: Optional[Sequence[int]] = None
) -> dict:
  """Embeds studies.

  images: uint8 [B, V, H, W] (or [B, V, H, W, C]) full images, all patches
  used; or, with ``patch_idx`` [B, V, K], a patch batch [B, V, K, p*p*C] as the
  pipeline yields it.  view_valid [B, V] defaults to all True.
  Returns {"global": [B, P], "local": [B, V*K, P], "local_mask", "hidden": [B, V, 1+K, h]}.
  """
  mcfg = model_config(cfg)
  images = jnp.asarray(images)
  if patch_idx is None:
    patches, idx = patchify(images, mcfg.image.patch_size)
    patch_idx = jnp.broadcast_to(idx, patches.shape[:-1])
  else:
    patches = images
  if view_valid is None:
    view_valid = jnp.ones(patches.shape[:2], bool)
  slots = tuple(view_slots) if view_slots is not None else None
  return _image_fn(mcfg, slots)(variables, patches, jnp.asarray(patch_idx, jnp.int32), jnp.asarray(view_valid, bool))


def count_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
