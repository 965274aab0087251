"""ClinVLA losses (paper §3.4, protocols.md §4).

Global:  "infonce" - symmetric InfoNCE over the batch with a learnable, clamped
         logit scale (default, as in ALTA / CLIP / ConVIRT);
         "sigmoid" - SigLIP's pairwise sigmoid loss with a learnable scale and
         bias (an extension, not in the paper);
         "cosine"  - the paper's literal 1 - cos(v_img, v_txt) of positive pairs.
Local:   "gloria"  - GLoRIA word-region loss (attention of every word over the
         regions of every image, cross-entropy over the batch in both
         directions);
         "cosine"  - the paper's literal mean over words of 1 - cos(word,
         attended image context) for positive pairs only.
Total:   L = L_global + lambda * L_local.

All functions take masks instead of ragged slices; rows whose example is
invalid (padding) take no part as queries or as negatives.  Inputs are the
*global* batch, and every example sees every other as a negative.

Two forms of the contrastive losses give the same numbers:

* dense - the whole [B, B] score matrix (for GLoRIA a [B, B, regions, words]
  intermediate) in one expression; used on one device, and the reference;
* sharded - under a mesh whose batch axes hold more than one device (the
  ``jax.set_mesh`` context of the training step), a ``jax.shard_map`` over
  those axes.  Each device keeps its own images and receives the other
  devices' texts one block at a time round a ring (``ppermute``).  It holds
  one [B/N, B/N] block of scores at a time: the log-sum-exps of its rows, and
  those of the travelling columns, accumulate as the blocks pass, and each
  step is recomputed in the backward pass.  GLoRIA's word-region tensor is
  built ``chunk_size`` texts at a time, so per-device memory grows linearly
  with the global batch, not quadratically.

``batch_axes`` on each contrastive loss overrides the choice: ``None`` reads
the mesh, ``()`` forces the dense form, a tuple of mesh axis names forces the
sharded form over them.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from clinvla_jax.sharding import BATCH_AXES

_NEG = -1e30
DEFAULT_CHUNK_SIZE = 8


# ---------------------------------------------------------------------------
# Choosing the form from the mesh.


def mesh_batch_axes(batch: int) -> Tuple[str, ...]:
  """Batch axes of the current mesh context the sharded form should split over; () = dense.

  Axes that are already manual (inside another ``shard_map``) are left out:
  their data is per-device already.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return ()
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a not in mesh.manual_axes)
  size = math.prod(mesh.shape[a] for a in axes)
  # shard_map needs equal blocks; a batch that does not divide stays with XLA's partitioning.
  if size <= 1 or batch % size:
    return ()
  return axes


def _resolve_axes(batch_axes: Optional[Sequence[str]], batch: int) -> Tuple[str, ...]:
  return mesh_batch_axes(batch) if batch_axes is None else tuple(batch_axes)


def _over_batch(fn: Callable, axes: Tuple[str, ...], sharded_args, replicated_args):
  """``fn(*sharded_args, *replicated_args)`` as a shard_map: leading axes split over ``axes``, scalar out."""
  mapped = jax.shard_map(
    fn,
    mesh=jax.sharding.get_abstract_mesh(),
    out_specs=P(),
    in_specs=(P(axes),) * len(sharded_args) + (P(),) * len(replicated_args),
  )
  return mapped(*sharded_args, *replicated_args)


# ---------------------------------------------------------------------------
# Pieces of the sharded form (run inside the shard_map).


def _axis_size(axes) -> int:
  return lax.psum(1, axes)


def _ring_scan(step_fn: Callable, stationary, travelling, carry, axes):
  """Runs ``step_fn`` once per device block round the ring: (travelling, carry) after the last step.

  ``step_fn(s, stationary, travelling, carry) -> (travelling, carry)`` sees at
  step ``s`` the columns of device ``me - s`` (step 0: the device's own, with
  the positives on its diagonal).  ``travelling`` (the columns and whatever
  accumulates per column) moves one device on after every step, so after the
  last it is home again, carrying what every device added.  Each step is
  rematerialised: the backward pass keeps only the carries, never a score block.
  """
  num = _axis_size(axes)
  shift = [(i, (i + 1) % num) for i in range(num)]
  body = jax.checkpoint(step_fn)

  # Every step, the device's own block included, runs in one loop body so XLA
  # allocates its buffers once; the price is a last transfer that only brings
  # each block home.
  def step(state, s):
    moving, carry = body(s, stationary, *state)
    return (lax.ppermute(moving, axes, shift), carry), None

  start = jax.tree_util.tree_map(lambda x: _varying(x, axes), (travelling, carry))
  return lax.scan(step, start, jnp.arange(num))[0]


def _varying(x, axes):
  """``x`` typed as differing across ``axes``, as a scan carry that ``ppermute`` and per-device data feed must be."""
  missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
  return lax.pcast(x, missing, to="varying") if missing else x


def _empty_log_sum_exp(size: int):
  return jnp.full((size,), _NEG, jnp.float32), jnp.zeros((size,), jnp.float32)


def _add_to_log_sum_exp(acc, scores, mask, axis: int):
  """Running (max, sum of exp(x - max)) of ``acc`` with the masked ``scores`` reduced over ``axis`` added.

  The max is only a shift that keeps exp() in range; any shift gives the same
  value and gradient, so it takes none.
  """
  top, total = acc
  scores = jnp.where(mask, scores, _NEG)
  new_top = jnp.maximum(top, lax.stop_gradient(jnp.max(scores, axis=axis)))
  terms = jnp.where(mask, jnp.exp(scores - jnp.expand_dims(new_top, axis)), 0.0)
  return new_top, total * jnp.exp(top - new_top) + jnp.sum(terms, axis=axis)


def _log_sum_exp(acc):
  top, total = acc
  # An example with nothing to compare against (padding) gets a finite value
  # and no gradient, rather than log(0).
  return top + jnp.log(jnp.maximum(total, jnp.finfo(jnp.float32).tiny))


def _ring_cross_entropies(block_fn: Callable, stationary, travelling, valid, axes) -> Tuple[jax.Array, jax.Array]:
  """(CE(S), CE(S^T)) over the global batch, S = this device's rows scored against every device's columns.

  ``block_fn(stationary, columns) -> [b, b']`` scores the local rows against
  one device's columns.  Every row's log-sum-exp over the valid columns, and
  every column's over the valid rows, is accumulated as the blocks go round
  the ring (a column's part travels with it), so a device holds one
  ``[b, b']`` block of S at a time.  Each CE is the mean over valid examples
  of the log-sum-exp minus the positive score, as ``_masked_cross_entropy``.
  """
  size = valid.shape[0]

  def step(s, stationary, moving, carry):
    columns, column_valid, column_acc = moving
    row_acc, positive = carry
    scores = block_fn(stationary, columns)
    row_acc = _add_to_log_sum_exp(row_acc, scores, column_valid[None, :], axis=1)
    column_acc = _add_to_log_sum_exp(column_acc, scores, valid[:, None], axis=0)
    positive = jnp.where(s == 0, jnp.diagonal(scores), positive)
    return (columns, column_valid, column_acc), (row_acc, positive)

  start = (travelling, valid, _empty_log_sum_exp(size))
  moving, (row_acc, positive) = _ring_scan(
    step, stationary, start, (_empty_log_sum_exp(size), jnp.zeros((size,), jnp.float32)), axes
  )
  count = jnp.maximum(lax.psum(jnp.sum(valid), axes), 1)

  def mean_over_valid(nll):
    return lax.psum(jnp.sum(jnp.where(valid, nll, 0.0)), axes) / count

  # Home again, the travelling accumulator holds the log-sum-exps of this device's own columns.
  return mean_over_valid(_log_sum_exp(row_acc) - positive), mean_over_valid(_log_sum_exp(moving[2]) - positive)


def _chunked_columns(block_fn: Callable, stationary, columns, chunk_size: int) -> jax.Array:
  """``block_fn(stationary, columns)`` ([b, b']) computed ``chunk`` columns at a time, each chunk rematerialised."""
  total = jax.tree_util.tree_leaves(columns)[0].shape[0]
  chunk = _largest_divisor_at_most(total, chunk_size)
  if chunk == total:
    return block_fn(stationary, columns)
  chunks = jax.tree_util.tree_map(lambda x: x.reshape(total // chunk, chunk, *x.shape[1:]), columns)
  score = jax.checkpoint(block_fn)
  _, blocks = lax.scan(lambda carry, c: (carry, score(stationary, c)), None, chunks)  # [n, b, chunk]
  return jnp.moveaxis(blocks, 0, 1).reshape(blocks.shape[1], total)


def _largest_divisor_at_most(n: int, limit: int) -> int:
  return next(d for d in range(max(min(n, int(limit)), 1), 0, -1) if n % d == 0)


# ---------------------------------------------------------------------------
# Global losses.


def _masked_cross_entropy(logits, valid):
  """Mean over valid rows of CE(logits[i], i); invalid columns are excluded."""
  logits = jnp.where(valid[None, :], logits, _NEG)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.diagonal(log_probs)
  return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


def _as_valid(valid, batch):
  return jnp.ones((batch,), bool) if valid is None else jnp.asarray(valid).astype(bool)


def _clamped_scale(logit_scale, max_logit_scale):
  return jnp.exp(jnp.minimum(jnp.asarray(logit_scale, jnp.float32), max_logit_scale))


def _dot_rows(image_emb, text_block):
  return jnp.einsum("ip,jp->ij", image_emb.astype(jnp.float32), text_block.astype(jnp.float32))


def infonce_loss(
  image_emb,
  text_emb,
  logit_scale,
  valid=None,
  max_logit_scale=math.log(100.0),
  batch_axes: Optional[Sequence[str]] = None,
):
  """Symmetric InfoNCE (mean of both directions) on L2-normalised embeddings.

  Returns (loss, scale) where scale = exp(min(logit_scale, max_logit_scale)).
  """
  batch = image_emb.shape[0]
  valid = _as_valid(valid, batch)
  scale = _clamped_scale(logit_scale, max_logit_scale)
  axes = _resolve_axes(batch_axes, batch)
  if not axes:
    logits = scale * _dot_rows(image_emb, text_emb)
    return 0.5 * (_masked_cross_entropy(logits, valid) + _masked_cross_entropy(logits.T, valid)), scale

  def local(image, text, valid, scale):
    block = lambda image, text: scale * _dot_rows(image, text)  # noqa: E731
    image_to_text, text_to_image = _ring_cross_entropies(block, image, text, valid, axes)
    return 0.5 * (image_to_text + text_to_image)

  return _over_batch(local, axes, (image_emb, text_emb, valid), (scale,)), scale


def _sigmoid_log_likelihood(logits, positive, pair_valid):
  """Sum of log sigmoid(+-logit) over valid pairs: + for positives, - for every other pair."""
  signs = jnp.where(positive, 1.0, -1.0)
  return jnp.sum(jnp.where(pair_valid, jax.nn.log_sigmoid(signs * logits), 0.0))


def sigmoid_loss(
  image_emb,
  text_emb,
  logit_scale,
  logit_bias,
  valid=None,
  max_logit_scale=math.log(100.0),
  batch_axes: Optional[Sequence[str]] = None,
):
  """SigLIP's pairwise sigmoid loss (Zhai et al., 2023) on L2-normalised embeddings.

  -1/|B| sum_i sum_j log sigmoid(z_ij (t <x_i, y_j> + b)), z_ii = 1, z_ij = -1
  otherwise, over valid examples; t = exp(min(logit_scale, max_logit_scale)).
  Returns (loss, t).
  """
  batch = image_emb.shape[0]
  valid = _as_valid(valid, batch)
  scale = _clamped_scale(logit_scale, max_logit_scale)
  bias = jnp.asarray(logit_bias, jnp.float32)
  count = jnp.maximum(jnp.sum(valid), 1)
  axes = _resolve_axes(batch_axes, batch)
  if not axes:
    logits = scale * _dot_rows(image_emb, text_emb) + bias
    pair_valid = valid[:, None] & valid[None, :]
    return -_sigmoid_log_likelihood(logits, jnp.eye(batch, dtype=bool), pair_valid) / count, scale

  def local(image, text, valid, scale, bias, count):
    # One [b, b] block of logits at a time; only the sum of its log-likelihoods is kept.
    def step(s, image, moving, total):
      text, text_valid = moving
      logits = scale * _dot_rows(image, text) + bias
      positive = (s == 0) & jnp.eye(logits.shape[0], dtype=bool)  # the own block's diagonal
      pair_valid = valid[:, None] & text_valid[None, :]
      return moving, total + _sigmoid_log_likelihood(logits, positive, pair_valid)

    _, log_likelihood = _ring_scan(step, image, (text, valid), jnp.zeros((), jnp.float32), axes)
    return -lax.psum(log_likelihood, axes) / count

  return _over_batch(local, axes, (image_emb, text_emb, valid), (scale, bias, count)), scale


def cosine_global_loss(image_emb, text_emb, valid=None):
  """Paper eq.: mean over positive pairs of 1 - cos(v_img, v_txt)."""
  cos = _cosine(image_emb, text_emb)
  valid = jnp.ones(cos.shape, bool) if valid is None else valid.astype(bool)
  return jnp.sum(jnp.where(valid, 1.0 - cos, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


# ---------------------------------------------------------------------------
# Local losses.


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
  scores = jnp.einsum("itp,jrp->ijrt", words, regions)  # [Bt, Bi, R, T]
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
  context = word_region_context(words, word_mask, regions, region_mask, temp1)  # [Bt, Bi, T, P]
  cos = _cosine(words[:, None, :, :], context)  # [Bt, Bi, T]
  mask = word_mask[:, None, :]
  sim = jax.nn.logsumexp(jnp.where(mask, temp2 * cos, _NEG), axis=-1)
  # A text without real words has no local evidence: score 0 rather than -inf.
  sim = jnp.where(jnp.any(mask, axis=-1), sim, 0.0)
  return temp3 * sim.T


def gloria_local_loss(
  words,
  word_mask,
  regions,
  region_mask,
  temperatures,
  valid=None,
  chunk_size: int = DEFAULT_CHUNK_SIZE,
  batch_axes: Optional[Sequence[str]] = None,
):
  """GLoRIA local loss: CE(scores) + CE(scores^T) over ``gloria_local_scores``.

  ``chunk_size``: texts per word-region block in the sharded form (per-device
  memory about local batch x chunk_size x regions x words floats).
  """
  batch = regions.shape[0]
  valid = _as_valid(valid, batch)
  axes = _resolve_axes(batch_axes, batch)
  if not axes:
    scores = gloria_local_scores(words, word_mask, regions, region_mask, temperatures)
    return _masked_cross_entropy(scores, valid) + _masked_cross_entropy(scores.T, valid)

  def local(words, word_mask, regions, region_mask, valid, temperatures):
    def block(images, texts):
      return _chunked_columns(
        lambda im, tx: gloria_local_scores(tx[0], tx[1], im[0], im[1], temperatures), images, texts, chunk_size
      )

    image_to_text, text_to_image = _ring_cross_entropies(block, (regions, region_mask), (words, word_mask), valid, axes)
    return image_to_text + text_to_image

  return _over_batch(
    local, axes, (words, word_mask, regions, region_mask, valid), (jnp.asarray(temperatures, jnp.float32),)
  )


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


# ---------------------------------------------------------------------------
# Total.


def _global_loss(outputs, loss_cfg, valid, metrics):
  image, text = outputs["image"]["global"], outputs["text"]["global"]
  if loss_cfg.global_type == "infonce":
    loss, metrics["logit_scale"] = infonce_loss(image, text, outputs["logit_scale"], valid, loss_cfg.max_logit_scale)
  elif loss_cfg.global_type == "sigmoid":
    if "logit_bias" not in outputs:
      raise ValueError(
        "loss.global_type='sigmoid' needs the model's logit_bias: build the model from the "
        "full config (api.build_model(config)), which adds it for the sigmoid loss"
      )
    loss, metrics["logit_scale"] = sigmoid_loss(
      image, text, outputs["logit_scale"], outputs["logit_bias"], valid, loss_cfg.max_logit_scale
    )
    metrics["logit_bias"] = outputs["logit_bias"]
  elif loss_cfg.global_type == "cosine":
    loss = cosine_global_loss(image, text, valid)
  else:
    raise ValueError(f"Unknown loss.global_type {loss_cfg.global_type!r}")
  return loss


def _local_loss(outputs, loss_cfg, valid):
  image, text = outputs["image"], outputs["text"]
  args = (text["local"], text["local_mask"], image["local"], image["local_mask"], outputs["local_temperatures"], valid)
  if loss_cfg.local_type == "gloria":
    return gloria_local_loss(*args, chunk_size=int(loss_cfg.get("chunk_size", DEFAULT_CHUNK_SIZE)))
  if loss_cfg.local_type == "cosine":
    return cosine_local_loss(*args)
  raise ValueError(f"Unknown loss.local_type {loss_cfg.local_type!r}")


def clinvla_loss(
  outputs: Dict, loss_cfg, example_valid: Optional[jax.Array] = None
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """Total loss and its parts from the model's outputs (``ClinVLA.__call__``)."""
  if not (loss_cfg.use_global or loss_cfg.use_local):
    raise ValueError("loss.use_global and loss.use_local are both False: nothing to train")
  metrics = {}
  total = jnp.zeros((), jnp.float32)
  if loss_cfg.use_global:
    metrics["loss_global"] = _global_loss(outputs, loss_cfg, example_valid, metrics)
    total = total + metrics["loss_global"]
  if loss_cfg.use_local:
    metrics["loss_local"] = _local_loss(outputs, loss_cfg, example_valid)
    total = total + loss_cfg.local_weight * metrics["loss_local"]
  metrics["loss"] = total
  return total, metrics
