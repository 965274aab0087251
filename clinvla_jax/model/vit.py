"""The image tower: a ViT over pre-masked patches of several views.

Semantics follow timm's ``VisionTransformer`` (pre-LN blocks, fused qkv with
bias, exact GELU, final LayerNorm, LayerNorm eps 1e-6) so that timm / MAE / MRM
weights load through ``clinvla_jax.convert.timm_vit``.  The patch embedding is
a matmul on flattened patches, which equals timm's stride-16 convolution.

Each view is its own sequence (views are folded into the batch); tokens get
the fixed 2-D sin-cos position embedding of their patch index, plus a learned
view (frontal / lateral) and time (current / prior) embedding.

Two block layouts (``adapter_style``): "clinvla", one ReLU bottleneck adapter
after the MLP inside its residual; "alta", ALTA's two GELU adapters per block,
one on the attention output (with its own skip) and one parallel to the MLP,
scaled by 0.5.
"""

from __future__ import annotations

import dataclasses
from typing import Tuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from clinvla_jax.model import layers

# View slot -> (view type, time) for the four record views:
# current frontal, current lateral, prior frontal, prior lateral.
VIEW_TYPE = (0, 1, 0, 1)  # 0 frontal, 1 lateral
VIEW_TIME = (0, 0, 1, 1)  # 0 current, 1 prior

# The blocks' parameters: "blocks_{i}" per block, or "blocks" stacked with scan_layers.
BLOCKS = "blocks"

# Fixed position tables by name (``pos_embed``); "learned" is a parameter instead.
FIXED_POS_EMBEDS = ("sincos", "sincos_mrm")
POS_EMBEDS = FIXED_POS_EMBEDS + ("learned",)
ADAPTER_STYLES = ("clinvla", "alta")
MISSING_VIEW_TOKENS = ("shared", "per_patch")
# ALTA adds its MLP-parallel adapter at half weight.
ALTA_MLP_ADAPTER_SCALE = 0.5


@dataclasses.dataclass(frozen=True)
class ImageTowerConfig:
  num_layers: int = 12
  hidden_size: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  patch_size: int = 16
  image_size: int = 224
  channels: int = 3
  # "sincos": MAE's fixed table; "sincos_mrm": MRM's / ALTA's fixed table (what MRM ViT-B/16 weights
  # were trained with); "learned": a parameter, filled from a checkpoint's pos_embed when loaded.
  pos_embed: str = "sincos"
  adapter_dim: int = 64  # 0 disables the per-block adapters
  adapter_style: str = "clinvla"  # "clinvla" (one ReLU adapter after the MLP) or "alta" (two GELU adapters)
  # "shared": one learned token for every position of a missing view, CLS slot included;
  # "per_patch": ALTA's, one learned token per patch position, the missing view keeping the normal CLS.
  missing_view_token: str = "shared"
  adapter_init: str = "identity"
  layer_norm_eps: float = 1e-6
  pixel_mean: float = 0.4785
  pixel_std: float = 0.2834
  dtype: str = "float32"  # legacy: the 16-bit policy of this dtype when precision is ""
  precision: str = ""  # a layers.precision_policy spec; "" follows dtype
  remat: bool = False  # legacy switch: True is remat_policy "full"
  remat_policy: str = ""  # layers.REMAT_POLICIES name; "" follows remat
  residual_grad_barrier: bool = False  # layers.residual_grad_barrier after each block (model.residual_grad_barrier)
  attention_impl: str = "xla"  # "xla" | "cudnn" (fused, GPU bf16) | "jax"; see layers.dot_product_attention
  scan_layers: bool = False  # one nn.scan over the blocks (params "blocks", stacked); see layers.apply_blocks

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2


def sincos_2d_position_embedding(grid_size: int, dim: int, frequencies: str = "mae") -> np.ndarray:
  """Fixed 2-D sin-cos embedding, [1 + grid_size**2, dim], row 0 (CLS) zeros.

  Half the channels encode one grid coordinate and half the other, each as
  [sin, cos] of position times frequencies; the first half uses the column
  coordinate of a row-major patch index.  ``frequencies``:

  * "mae": 1 / 10000**(i / (dim / 4)), i < dim / 4 — MAE's table (and MAE
    checkpoints').
  * "mrm": 1 / 10000**(i / dim) — the table MRM and ALTA build (their code
    divides by the half-width twice), so MRM / ALTA ViT-B/16 weights were
    trained with it.  It spans a narrower band of frequencies; the two tables
    differ by up to about 2.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs hidden_size % 4 == 0, got {dim}")
  if frequencies == "mae":
    exponent_scale = dim / 4.0
  elif frequencies == "mrm":
    exponent_scale = float(dim)
  else:
    raise ValueError(f"frequencies={frequencies!r}; expected 'mae' or 'mrm'")
  rows, cols = np.meshgrid(
    np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij"
  )

  def one_axis(pos):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / exponent_scale)
    angles = pos.reshape(-1)[:, None] * omega[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  emb = np.concatenate([one_axis(cols), one_axis(rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), emb], axis=0).astype(np.float32)


def fixed_position_table(name: str, grid_size: int, dim: int) -> np.ndarray:
  """The table of a fixed ``pos_embed`` name ("sincos" or "sincos_mrm")."""
  if name == "sincos":
    return sincos_2d_position_embedding(grid_size, dim, "mae")
  if name == "sincos_mrm":
    return sincos_2d_position_embedding(grid_size, dim, "mrm")
  raise ValueError(f"pos_embed={name!r} is not a fixed table; fixed tables: {FIXED_POS_EMBEDS}")


class Attention(nn.Module):
  num_heads: int
  precision: layers.Precision
  implementation: str = "xla"

  @nn.compact
  def __call__(self, x):
    dim = x.shape[-1]
    head_dim = dim // self.num_heads
    qkv = layers.dense(
      (3, self.num_heads, head_dim), ("embed", None, "heads", "kv"), name="qkv", precision=self.precision
    )(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    q = layers.constrain(q, ("batch", "act_length", "act_heads", "act_kv"))
    out = layers.dot_product_attention(q, k, v, None, precision=self.precision, implementation=self.implementation)
    return layers.dense(dim, ("heads", "kv", "embed"), name="proj", precision=self.precision, axis=(-2, -1))(out)


class Mlp(nn.Module):
  mlp_dim: int
  precision: layers.Precision

  @nn.compact
  def __call__(self, x):
    y = layers.dense(self.mlp_dim, ("embed", "mlp"), name="fc1", precision=self.precision)(x)
    y = layers.gelu_exact(y)
    y = layers.constrain(y, ("batch", "act_length", "act_mlp"))
    return layers.dense(x.shape[-1], ("mlp", "embed"), name="fc2", precision=self.precision)(y)


class Block(nn.Module):
  """Pre-LN transformer block with the adapters of ``adapter_style``.

  "clinvla": x + Attn(LN(x)), then x + (m + A(m)) with m = MLP(LN(x)).
  "alta": x + (a + A1(a)) with a = Attn(LN(x)), then x + MLP(y) + 0.5 A2(y)
  with y = LN(x); A1 and A2 are GELU bottlenecks.
  """

  config: ImageTowerConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    prec = layers.tower_precision(cfg)
    if cfg.adapter_style not in ADAPTER_STYLES:
      raise ValueError(f"model.image.adapter_style={cfg.adapter_style!r}; expected one of {ADAPTER_STYLES}")
    alta = cfg.adapter_style == "alta" and cfg.adapter_dim

    def adapter(name):
      activation = "gelu" if alta else "relu"
      return layers.BottleneckAdapter(cfg.adapter_dim, cfg.adapter_init, prec, activation, name=name)

    y = layers.LayerNorm(cfg.layer_norm_eps, prec, name="norm1")(x)
    a = Attention(cfg.num_heads, prec, cfg.attention_impl, name="attn")(y)
    if alta:
      a = a + adapter("attn_adapter")(a)
    x = x + a
    y = layers.LayerNorm(cfg.layer_norm_eps, prec, name="norm2")(x)
    m = Mlp(cfg.mlp_dim, prec, name="mlp")(y)
    if alta:
      m = m + ALTA_MLP_ADAPTER_SCALE * adapter("mlp_adapter")(y)
    elif cfg.adapter_dim:
      m = m + adapter("adapter")(m)
    x = x + m
    x = layers.constrain(x, ("batch", "act_length", "act_embed"))
    return layers.residual_grad_barrier(x) if cfg.residual_grad_barrier else x


class ImageTower(nn.Module):
  """ViT over kept patches of several views.

  __call__(patches [B, V, K, p*p*C'], patch_idx [B, V, K], view_valid [B, V],
  view_slots: the record view slot (0..3) of each of the V inputs)
  returns hidden [B, V, 1 + K, h]: the last hidden state (after the final
  LayerNorm), CLS first.

  Pixels: uint8 patches are normalised with (x / 255 - mean) / std; float
  patches are taken as already normalised.  C' may be 1 (grayscale) for a
  3-channel model: summing the kernel over channels is exactly the same as
  feeding the gray value replicated to every channel.
  """

  config: ImageTowerConfig

  @nn.compact
  def __call__(self, patches, patch_idx, view_valid, view_slots: Tuple[int, ...]):
    cfg = self.config
    prec = layers.tower_precision(cfg)
    batch, num_views, num_kept, _ = patches.shape
    if num_views != len(view_slots):
      raise ValueError(f"{num_views} views given but view_slots={view_slots}")
    width = cfg.hidden_size
    # Parameters are created in the order of the original single function (patch embedding, positions, CLS,
    # missing token, view/time): their random initialisation follows that order.
    tokens = self._patch_tokens(patches, prec)
    pos_table = self._position_table()
    tokens = tokens + jnp.take(pos_table, patch_idx.reshape(batch * num_views, num_kept) + 1, axis=0).astype(
      tokens.dtype
    )
    cls = self.param(
      "cls_token", layers.with_axes(nn.initializers.normal(1e-6), (None, "embed")), (1, width), jnp.float32
    )
    cls = (cls + pos_table[:1]).astype(tokens.dtype)
    tokens = jnp.concatenate([jnp.broadcast_to(cls[None], (batch * num_views, 1, width)), tokens], axis=1)
    tokens = tokens.reshape(batch, num_views, 1 + num_kept, width)
    missing_seq = self._missing_view_sequence(patch_idx, pos_table, cls, tokens.dtype)
    tokens = jnp.where(view_valid.astype(bool)[:, :, None, None], tokens, missing_seq)
    tokens = tokens + self._view_time_embedding(view_slots).astype(tokens.dtype)[None, :, None, :]

    x = tokens.reshape(batch * num_views, 1 + num_kept, width)
    x = layers.constrain(x, ("batch", "act_length", "act_embed"))
    x = layers.apply_blocks(Block, cfg, x, name=BLOCKS)
    x = layers.LayerNorm(cfg.layer_norm_eps, prec, name="norm")(x)
    return x.reshape(batch, num_views, 1 + num_kept, width)

  def _patch_tokens(self, patches, prec):
    """[B, V, K, p*p*C'] pixels -> [B*V, K, h] patch embeddings (before positions)."""
    cfg = self.config
    batch, num_views, num_kept, patch_dim = patches.shape
    pixels_per_channel = cfg.patch_size * cfg.patch_size
    if patch_dim not in (pixels_per_channel, pixels_per_channel * cfg.channels):
      raise ValueError(
        f"patch vector length {patch_dim} fits neither 1 nor {cfg.channels} channels "
        f"of {cfg.patch_size}x{cfg.patch_size} patches"
      )
    if patches.dtype == jnp.uint8:
      x = (patches.astype(jnp.float32) / 255.0 - cfg.pixel_mean) / cfg.pixel_std
    else:
      x = patches.astype(jnp.float32)
    x = x.reshape(batch * num_views, num_kept, patch_dim)
    width = cfg.hidden_size
    kernel = self.param(
      "patch_embed_kernel",
      layers.with_axes(layers.trunc_normal_02, ("patch", "embed")),
      (pixels_per_channel * cfg.channels, width),
      jnp.float32,
    )
    bias = self.param("patch_embed_bias", layers.with_axes(nn.initializers.zeros, ("embed",)), (width,), jnp.float32)
    if patch_dim == pixels_per_channel and cfg.channels > 1:
      kernel = kernel.reshape(pixels_per_channel, cfg.channels, width).sum(axis=1)
    return (layers.einsum("bkp,pd->bkd", x, kernel, prec) + bias).astype(prec.activations_dtype)

  def _position_table(self):
    """float32 [1 + num_patches, h]: the CLS position first."""
    cfg = self.config
    if cfg.pos_embed in FIXED_POS_EMBEDS:
      return jnp.asarray(fixed_position_table(cfg.pos_embed, cfg.grid_size, cfg.hidden_size))
    if cfg.pos_embed == "learned":
      return self.param(
        "pos_embedding",
        layers.with_axes(layers.trunc_normal_02, (None, "embed")),
        (1 + cfg.num_patches, cfg.hidden_size),
        jnp.float32,
      )
    raise ValueError(f"model.image.pos_embed={cfg.pos_embed!r}; expected one of {POS_EMBEDS}")

  def _missing_view_sequence(self, patch_idx, pos_table, cls, dtype):
    """[B, V, 1 + K, h]: what a missing view's tokens are replaced by.

    A missing view becomes a sequence of the learned missing token; it still gets position/view/time embeddings
    so that the sequence is well formed; whether its outputs count in pooling is the model's choice
    (missing_view_pooling).
    """
    cfg = self.config
    batch, num_views, _ = patch_idx.shape
    width = cfg.hidden_size
    if cfg.missing_view_token == "shared":
      missing = self.param("missing_token", layers.with_axes(layers.normal_02, ("embed",)), (width,), jnp.float32)
      return missing.astype(dtype) + jnp.concatenate(
        [jnp.broadcast_to(pos_table[:1], (batch, num_views, 1, width)), jnp.take(pos_table, patch_idx + 1, axis=0)],
        axis=2,
      ).astype(dtype)
    if cfg.missing_view_token == "per_patch":
      missing = self.param(
        "missing_token", layers.with_axes(layers.normal_02, (None, "embed")), (cfg.num_patches, width), jnp.float32
      )
      missing_patches = jnp.take(missing, patch_idx, axis=0) + jnp.take(pos_table, patch_idx + 1, axis=0)
      return jnp.concatenate(
        [jnp.broadcast_to(cls[None, None], (batch, num_views, 1, width)), missing_patches.astype(dtype)], axis=2
      )
    raise ValueError(
      f"model.image.missing_view_token={cfg.missing_view_token!r}; expected one of {MISSING_VIEW_TOKENS}"
    )

  def _view_time_embedding(self, view_slots: Tuple[int, ...]):
    """float32 [V, h]: each input's view type (frontal / lateral) plus its time (current / prior) embedding."""
    width = self.config.hidden_size
    view_embed = self.param("view_embed", layers.with_axes(layers.normal_02, (None, "embed")), (2, width), jnp.float32)
    time_embed = self.param("time_embed", layers.with_axes(layers.normal_02, (None, "embed")), (2, width), jnp.float32)
    slot_type = jnp.asarray([VIEW_TYPE[s] for s in view_slots])
    slot_time = jnp.asarray([VIEW_TIME[s] for s in view_slots])
    return view_embed[slot_type] + time_embed[slot_time]
