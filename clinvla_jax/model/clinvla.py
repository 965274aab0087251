"""ClinVLA: both towers, their projection heads, and the loss parameters.

The module exposes ``encode_image`` and ``encode_text`` (used for evaluation
and embedding) and ``__call__`` (both, for training).  Outputs per tower:

  global      [B, P]      L2-normalised global embedding
  local       [B, N, P]   local features (image: kept patches of the used views;
                          text: token features), not normalised
  local_mask  [B, N]      True where a local feature is real
  hidden      image [B, V, 1 + K, h] / text [B, T, h]: the backbone's last
              hidden state before any head (for peer comparison)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from clinvla_jax.model import layers
from clinvla_jax.model.bert import TextTower, TextTowerConfig
from clinvla_jax.model.vit import ImageTower, ImageTowerConfig

NUM_VIEW_SLOTS = 4


@dataclasses.dataclass(frozen=True)
class ClinVLAConfig:
  image: ImageTowerConfig = ImageTowerConfig()
  text: TextTowerConfig = TextTowerConfig()
  proj_dim: int = 128
  multiview: bool = True  # use lateral views
  temporal: bool = True  # use prior-study views
  logit_scale_init: float = math.log(1 / 0.07)
  # A learnable logit bias for the sigmoid global loss; None (every other loss) adds no parameter,
  # so the parameter tree, and checkpoints, stay as they were.
  logit_bias_init: Optional[float] = None
  local_temperatures: Tuple[float, float, float] = (4.0, 5.0, 10.0)  # GLoRIA temp1, temp2, temp3
  learn_local_temperatures: bool = False
  # "clinvla": Dense(h) -> LayerNorm -> GELU -> Dense(P); "alta": Dense(P) -> GELU -> LayerNorm(eps 1e-12) -> Dense(P).
  head_style: str = "clinvla"
  # "valid": a missing view counts in neither the pooled CLS nor the local features; "all": ALTA's,
  # the CLS of every used view is averaged and every view's patches are local features.
  missing_view_pooling: str = "valid"

  @classmethod
  def from_config(cls, model_cfg, loss_cfg=None) -> "ClinVLAConfig":
    """Builds the frozen (hashable) config from the ``model`` ConfigDict.

    With ``loss_cfg.global_type == "sigmoid"`` the loss parameters follow
    SigLIP: a logit bias, and the logit scale's start from the loss config.
    """
    d = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    d.update(_loss_parameter_fields(loss_cfg))
    image = ImageTowerConfig(**d.pop("image"))
    text = TextTowerConfig(**d.pop("text"))
    dtype = d.pop("dtype", None)
    precision = d.pop("precision", None)
    remat = d.pop("remat", None)
    barrier = d.pop("residual_grad_barrier", None)
    if dtype is not None:
      image, text = dataclasses.replace(image, dtype=dtype), dataclasses.replace(text, dtype=dtype)
    image, text = (dataclasses.replace(t, precision=resolve_precision(precision, t)) for t in (image, text))
    if remat is not None:
      image, text = dataclasses.replace(image, remat=remat), dataclasses.replace(text, remat=remat)
    if barrier is not None:
      on = layers.grad_barrier_enabled(str(barrier))
      image, text = (dataclasses.replace(t, residual_grad_barrier=on) for t in (image, text))
    if "local_temperatures" in d:
      d["local_temperatures"] = tuple(d["local_temperatures"])
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown model config fields: {unknown}")
    return cls(image=image, text=text, **d)

  @property
  def view_slots(self) -> Tuple[int, ...]:
    """Record view slots the model uses (ablations drop laterals / priors)."""
    slots = [0]
    if self.multiview:
      slots.append(1)
    if self.temporal:
      slots.append(2)
      if self.multiview:
        slots.append(3)
    return tuple(slots)


def resolve_precision(model_precision: Optional[str], tower) -> str:
  """The concrete policy name a tower runs under (``layers.POLICIES`` or a key=value spec).

  The most specific setting wins: the tower's own ``precision``; then a 16-bit
  tower ``dtype`` (the older way to ask for 16-bit compute, read as that
  dtype's all-16-bit policy); then ``model.precision``; float32 when none is
  set.  "auto" becomes the backend's default here.
  """
  spec = tower.precision or (tower.dtype if tower.dtype != "float32" else "") or model_precision or "float32"
  return layers.precision_policy(spec).name


def matmul_ready_params(params, mcfg: ClinVLAConfig):
  """``params`` with the dense-layer kernels in their tower's matmul dtype.

  Every product casts its kernel to the policy's matmul dtype; for weights that
  do not change (frozen backbones in training, all of them in evaluation)
  casting once beforehand saves that pass over the weights at every call.
  Embedding tables, norms and biases stay float32, as the policies use them;
  under float32 the tree comes back as it is.
  """
  towers = {"image": layers.tower_precision(mcfg.image), "text": layers.tower_precision(mcfg.text)}

  def cast(path, x):
    keys = [str(getattr(k, "key", k)) for k in path]
    if keys and keys[0] == "params":  # a variables dict
      keys = keys[1:]
    precision = towers.get(keys[0].split("_")[0]) if keys else None
    # Dense kernels only: the patch embedding sums its kernel over colour
    # channels for grayscale input before the product, which must see float32.
    if precision is None or keys[-1] != "kernel" or x.dtype == precision.matmul_dtype:
      return x
    return x.astype(precision.matmul_dtype)

  return jax.tree_util.tree_map_with_path(cast, params)


# SigLIP's initialisation of the sigmoid global loss: logit scale log(10) (t = 10), logit bias -10.
SIGMOID_LOGIT_SCALE_INIT = math.log(10.0)
SIGMOID_LOGIT_BIAS_INIT = -10.0


def _loss_parameter_fields(loss_cfg) -> dict:
  if loss_cfg is None or loss_cfg.get("global_type") != "sigmoid":
    return {}
  return {
    "logit_scale_init": float(loss_cfg.get("sigmoid_logit_scale_init", SIGMOID_LOGIT_SCALE_INIT)),
    "logit_bias_init": float(loss_cfg.get("sigmoid_logit_bias_init", SIGMOID_LOGIT_BIAS_INIT)),
  }


HEAD_STYLES = ("clinvla", "alta")
MISSING_VIEW_POOLING = ("valid", "all")
# ALTA's heads follow HF's BertPredictionHeadTransform: LayerNorm eps 1e-12.
ALTA_HEAD_EPS = 1e-12


class ProjectionHead(nn.Module):
  """style "clinvla": h -> Dense(h) -> LayerNorm -> GELU -> Dense(P).
  style "alta": h -> Dense(P) -> GELU -> LayerNorm -> Dense(P) (LayerNorm eps 1e-12)."""

  proj_dim: int
  precision: layers.Precision
  eps: float = 1e-6
  style: str = "clinvla"

  @nn.compact
  def __call__(self, x):
    if self.style == "alta":
      y = layers.dense(self.proj_dim, ("embed", "proj"), name="dense1", precision=self.precision)(x)
      y = layers.gelu_exact(y)
      y = layers.LayerNorm(ALTA_HEAD_EPS, self.precision, name="norm")(y)
      return layers.dense(self.proj_dim, (None, "proj"), name="dense2", precision=self.precision)(y).astype(jnp.float32)
    if self.style != "clinvla":
      raise ValueError(f"model.head_style={self.style!r}; expected one of {HEAD_STYLES}")
    width = x.shape[-1]
    y = layers.dense(width, ("embed", "mlp"), name="dense1", precision=self.precision)(x)
    y = layers.LayerNorm(self.eps, self.precision, name="norm")(y)
    y = layers.gelu_exact(y)
    # Embeddings leave the model in float32 whatever the policy: the losses and
    # the L2 normalisation run in float32.
    return layers.dense(self.proj_dim, ("mlp", "proj"), name="dense2", precision=self.precision)(y).astype(jnp.float32)


def l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def text_local_mask(attention_mask):
  """Real word pieces only: padding, [CLS] (first) and [SEP] (last real) excluded."""
  mask = attention_mask.astype(bool)
  length = jnp.sum(mask, axis=1, keepdims=True)
  positions = jnp.arange(mask.shape[1])[None, :]
  return mask & (positions > 0) & (positions < length - 1)


class ClinVLA(nn.Module):
  config: ClinVLAConfig

  def setup(self):
    cfg = self.config
    self.image_tower = ImageTower(cfg.image)
    self.text_tower = TextTower(cfg.text)
    image_precision, text_precision = layers.tower_precision(cfg.image), layers.tower_precision(cfg.text)
    if cfg.missing_view_pooling not in MISSING_VIEW_POOLING:
      raise ValueError(
        f"model.missing_view_pooling={cfg.missing_view_pooling!r}; expected one of {MISSING_VIEW_POOLING}"
      )
    head = lambda precision: ProjectionHead(cfg.proj_dim, precision, style=cfg.head_style)
    self.image_global_head = head(image_precision)
    self.image_local_head = head(image_precision)
    self.text_global_head = head(text_precision)
    self.text_local_head = head(text_precision)
    self.logit_scale = self.param(
      "logit_scale", layers.with_axes(nn.initializers.constant(cfg.logit_scale_init), ()), (), jnp.float32
    )
    if cfg.logit_bias_init is not None:
      self.logit_bias = self.param(
        "logit_bias", layers.with_axes(nn.initializers.constant(cfg.logit_bias_init), ()), (), jnp.float32
      )
    if cfg.learn_local_temperatures:
      init = jnp.log(jnp.asarray(cfg.local_temperatures, jnp.float32))
      self.local_log_temperatures = self.param(
        "local_log_temperatures", layers.with_axes(lambda *_: init, (None,)), (3,), jnp.float32
      )

  def local_temperatures(self):
    if self.config.learn_local_temperatures:
      return jnp.exp(self.local_log_temperatures)
    return jnp.asarray(self.config.local_temperatures, jnp.float32)

  def encode_image(self, patches, patch_idx, view_valid, view_slots: Optional[Tuple[int, ...]] = None):
    """patches [B, V, K, p*p*C], patch_idx [B, V, K], view_valid [B, V].

    With V = 4 (the record layout) the views the config disables are dropped
    before the tower runs.  With fewer views, ``view_slots`` names their record
    slots (default: the first V slots, e.g. (0,) = current frontal only).
    """
    num_views = patches.shape[1]
    if view_slots is None:
      if num_views == NUM_VIEW_SLOTS:
        view_slots = self.config.view_slots
        if view_slots != tuple(range(NUM_VIEW_SLOTS)):
          sel = np.asarray(view_slots)
          patches, patch_idx, view_valid = patches[:, sel], patch_idx[:, sel], view_valid[:, sel]
      else:
        view_slots = tuple(range(num_views))
    elif len(view_slots) != num_views:
      raise ValueError(f"view_slots {view_slots} do not match {num_views} input views")
    view_valid = view_valid.astype(bool)
    hidden = self.image_tower(patches, patch_idx, view_valid, tuple(view_slots))
    batch, used_views, seq, width = hidden.shape

    # ALTA pools (and aligns the patches of) every view, a missing one as its missing-token sequence.
    counted = view_valid if self.config.missing_view_pooling == "valid" else jnp.ones_like(view_valid)
    weights = counted.astype(jnp.float32)
    cls = hidden[:, :, 0, :].astype(jnp.float32)
    pooled = jnp.sum(cls * weights[..., None], axis=1) / jnp.maximum(jnp.sum(weights, axis=1, keepdims=True), 1.0)
    global_emb = l2_normalize(self.image_global_head(pooled))

    local = self.image_local_head(hidden[:, :, 1:, :]).reshape(batch, used_views * (seq - 1), -1)
    local_mask = jnp.repeat(counted, seq - 1, axis=1)
    return {"global": global_emb, "local": local, "local_mask": local_mask, "hidden": hidden}

  def encode_text(self, input_ids, attention_mask, deterministic: bool = True):
    hidden = self.text_tower(input_ids, attention_mask, deterministic=deterministic)
    global_emb = l2_normalize(self.text_global_head(hidden[:, 0, :]))
    local = self.text_local_head(hidden)
    return {"global": global_emb, "local": local, "local_mask": text_local_mask(attention_mask), "hidden": hidden}

  def __call__(self, patches, patch_idx, view_valid, input_ids, attention_mask, deterministic: bool = True):
    out = {
      "image": self.encode_image(patches, patch_idx, view_valid),
      "text": self.encode_text(input_ids, attention_mask, deterministic),
      "logit_scale": self.logit_scale,
      "local_temperatures": self.local_temperatures(),
    }
    if self.config.logit_bias_init is not None:
      out["logit_bias"] = self.logit_bias
    return out
