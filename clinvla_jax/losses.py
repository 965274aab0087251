"""ClinVLA losses (paper §3.4, protocols.md §4).

Global:  "infonce" - symmetric InfoNCE over the batch with a learnable, clamped
         logit scale (default, as in ALTA / CLIP / ConVIRT);
         "cosine"  - the paper's literal 1 - cos(v_img, v_txt) of positive pairs.
Local:   "gloria"  - GLoRIA word-region loss (attention of every word over the
         regions of every image, cross-entropy over the batch in both
         directions);
         "cosine"  - the paper's literal mean over words of 1 - cos(word,
         attended image context) for positive pairs only.
Total:   L = L_global + lambda * L_local.

All functions take masks instead of ragged slices; rows whose example is
invalid (padding) take no part as queries or as negatives.  Inputs are the
*global* batch: under ``jax.jit`` with sharded inputs XLA gathers what each
device needs, so every example sees every other as a negative.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp

_NEG = -1e30


def _masked_cross_entropy(logits, valid):
  """Mean over valid rows of CE(logits[i], i); invalid columns are excluded."""
  logits = jnp.where(valid[None, :], logits, _NEG)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.diagonal(log_probs)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def infonce_loss(image_emb, text_emb, logit_scale, valid=None, max_logit_scale=math.log(100.0)):
  """Symmetric InfoNCE (mean of both directions) on L2-normalised embeddings.

  Returns (loss, scale) where scale = exp(min(logit_scale, max_logit_scale)).
  """
  batch = image_emb.shape[0]
  valid = jnp.ones((batch,), bool) if valid is None else valid.astype(bool)
  scale = jnp.exp(jnp.minimum(logit_scale, max_logit_scale))
  logits = scale * jnp.einsum("ip,jp->ij", image_emb.astype(jnp.float32), text_emb.astype(jnp.float32))
  loss = 0.5 * (_masked_cross_entropy(logits, valid) + _masked_cross_entropy(logits.T, valid))
  return loss, scale


def cosine_global_loss(image_emb, text_emb, valid=None):
  """Paper eq.: mean over positive pairs of 1 - cos(v_img, v_txt)."""
  cos = _cosine(image_emb, text_emb)
  valid = jnp.ones(cos.shape, bool) if valid is None else valid.astype(bool)
  return jnp.sum(jnp.where(valid, 1.0 - cos, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _cosine(a, b, eps=1e-8):
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  # Norms through max(|x|^2, eps^2): a zero vector (e.g. the context of an
  # image whose views are all missing) must give a zero, not NaN, gradient.
  inv_a = jax.lax.rsqrt(jnp.maximum(jnp.sum(a * a, axis=-1), eps * eps))
  inv_b = jax.lax.rsqrt(jnp.maximum(jnp.sum(b * b, axis=-1), eps * eps))
  return jnp.sum(a * b, axis=-1) * inv_a * inv_b


def _masked_softmax(logits, mask, axis):
  logits = jnp.where(mask, logits, _NEG)
  weights = jax.nn.softmax(logits, axis=axis)
  return jnp.where(mask, weights, 0.0)


def word_region_context(words, word_mask, regions, region_mask, temp1):
  """GLoRIA attention of words over regions, for every (text i, image j) pair.

  words [Bt, T, P], word_mask [Bt, T], regions [Bi, R, P], region_mask [Bi, R].
  Returns the attended context c [Bt, Bi, T, P]: for each word, a softmax (over
  regions, sharpened by temp1) of the region-wise softmax over words.
  """
  words = words.astype(jnp.float32)
  regions = regions.astype(jnp.float32)
  scores = jnp.einsum("itp,jrp->ijrt", words, regions)            # [Bt, Bi, R, T]
  over_words = _masked_softmax(scores, word_mask[:, None, None, :], axis=-1)
  over_regions = _masked_softmax(temp1 * over_words, region_mask[None, :, :, None], axis=2)
  return jnp.einsum("ijrt,jrp->ijtp", over_regions, regions)


def gloria_local_scores(words, word_mask, regions, region_mask, temperatures):
  """GLoRIA's local image-text scores, ``[B_images, B_texts]`` (the logits of its local loss).

  R(i, j) = log sum_k exp(temp2 * cos(w_k, c_k)) over the real words of text j,
  each word attending over the regions of image i; score = temp3 * R.  Also a
  retrieval score for models trained with the local loss alone.
  """
  temp1, temp2, temp3 = temperatures[0], temperatures[1], temperatures[2]
  word_mask = word_mask.astype(bool)
  region_mask = region_mask.astype(bool)
  context = word_region_context(words, word_mask, regions, region_mask, temp1)   # [Bt, Bi, T, P]
  cos = _cosine(words[:, None, :, :], context)                                    # [Bt, Bi, T]
  mask = word_mask[:, None, :]
  sim = jax.nn.logsumexp(jnp.where(mask, temp2 * cos, _NEG), axis=-1)
  # A text without real words has no local evidence: score 0 rather than -inf.
  sim = jnp.where(jnp.any(mask, axis=-1), sim, 0.0)
  return temp3 * sim.T


def gloria_local_loss(words, word_mask, regions, region_mask, temperatures, valid=None):
  """GLoRIA local loss: CE(scores) + CE(scores^T) over ``gloria_local_scores``."""
  scores = gloria_local_scores(words, word_mask, regions, region_mask, temperatures)
  batch = scores.shape[0]
  valid = jnp.ones((batch,), bool) if valid is None else valid.astype(bool)
  return _masked_cross_entropy(scores, valid) + _masked_cross_entropy(scores.T, valid)


def cosine_local_loss(words, word_mask, regions, region_mask, temperatures, valid=None):
  """The paper's literal local loss for positive pairs: mean over words of 1 - cos(w_k, c_k)."""
  word_mask = word_mask.astype(bool)
  region_mask = region_mask.astype(bool)
  temp1 = temperatures[0]
  # Positive pairs only: each text attends over its own image's regions.
  scores = jnp.einsum("btp,brp->brt", words.astype(jnp.float32), regions.astype(jnp.float32))
  over_words = _masked_softmax(scores, word_mask[:, None, :], axis=-1)
  over_regions = _masked_softmax(temp1 * over_words, region_mask[:, :, None], axis=1)
  context = jnp.einsum("brt,brp->btp", over_regions, regions.astype(jnp.float32))
  per_word = jnp.where(word_mask, 1.0 - _cosine(words, context), 0.0)
  per_example = jnp.sum(per_word, axis=-1) / jnp.maximum(jnp.sum(word_mask, axis=-1), 1)
  valid = jnp.ones(per_example.shape, bool) if valid is None else valid.astype(bool)
  return jnp.sum(jnp.where(valid, per_example, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def clinvla_loss(outputs: Dict, loss_cfg, example_valid: Optional[jax.Array] = None
                 ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Total loss and its parts from the model's outputs (``ClinVLA.__call__``)."""
  image, text = outputs["image"], outputs["text"]
  metrics = {}
  total = jnp.zeros((), jnp.float32)
  if loss_cfg.use_global:
    if loss_cfg.global_type == "infonce":
      loss_global, scale = infonce_loss(image["global"], text["global"], outputs["logit_scale"], example_valid,
                                        loss_cfg.max_logit_scale)
      metrics["logit_scale"] = scale
    elif loss_cfg.global_type == "cosine":
      loss_global = cosine_global_loss(image["global"], text["global"], example_valid)
    else:
      raise ValueError(f"Unknown loss.global_type {loss_cfg.global_type!r}")
    metrics["loss_global"] = loss_global
    total = total + loss_global
  if loss_cfg.use_local:
    local_fn = {"gloria": gloria_local_loss, "cosine": cosine_local_loss}.get(loss_cfg.local_type)
    if local_fn is None:
      raise ValueError(f"Unknown loss.local_type {loss_cfg.local_type!r}")
    loss_local = local_fn(text["local"], text["local_mask"], image["local"], image["local_mask"],
                          outputs["local_temperatures"], example_valid)
    metrics["loss_local"] = loss_local
    total = total + loss_cfg.local_weight * loss_local
  if not (loss_cfg.use_global or loss_cfg.use_local):
    raise ValueError("loss.use_global and loss.use_local are both False: nothing to train")
  metrics["loss"] = total
  return total, metrics
