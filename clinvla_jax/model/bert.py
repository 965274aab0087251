"""The text tower: BERT with HuggingFace semantics plus MAD-X adapters.

Post-LN layers, exact GELU, additive attention mask, word + position +
token-type embeddings with LayerNorm (eps 1e-12): the same function as
``transformers.BertModel`` (without its pooler), so HF checkpoints (BERT,
BioBERT, CXR-BERT, MiniLM) load through ``clinvla_jax.convert.hf_bert``.

Adapters (protocols.md §3): the invertible adapter acts on the embedding
output; in every layer the language adapter LA and, stacked on it, the task
adapter TA act on the feed-forward output r before the residual add and
LayerNorm:  LA = U(ReLU(D(r))) + r,  TA = U'(ReLU(D'(LA))) + r.

``adapter_style="alta"`` places ALTA's two GELU adapters instead: one on the
attention block's output after its LayerNorm (with its own skip), and one fed
by that output, parallel to the feed-forward block, added at half weight
after the output LayerNorm.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from clinvla_jax.model import layers
from clinvla_jax.model.adapters import InvertibleAdapter

# The layers' parameters: "layer_{i}" per layer (HF's encoder.layer.{i}), or "layer" stacked with scan_layers.
LAYERS = "layer"
ADAPTER_STYLES = ("madx", "alta")
ALTA_MLP_ADAPTER_SCALE = 0.5


@dataclasses.dataclass(frozen=True)
class TextTowerConfig:
  num_layers: int = 12
  hidden_size: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  vocab_size: int = 28996  # BioBERT v1.1 (cased BERT-base vocabulary)
  max_len: int = 128
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dropout: float = 0.1
  attention_dropout: float = 0.1
  use_adapters: bool = True  # language + task adapters ("Transformer-Adapt"), or ALTA's two with adapter_style="alta"
  adapter_dim: int = 64
  adapter_style: str = "madx"  # "madx" (stacked language + task adapters) or "alta"
  invertible_adapter: bool = True
  adapter_init: str = "identity"
  dtype: str = "float32"  # legacy: the 16-bit policy of this dtype when precision is ""
  precision: str = ""  # a layers.precision_policy spec; "" follows dtype
  remat: bool = False  # legacy switch: True is remat_policy "full"
  remat_policy: str = ""  # layers.REMAT_POLICIES name; "" follows remat
  residual_grad_barrier: bool = False  # layers.residual_grad_barrier after each block (model.residual_grad_barrier)
  attention_impl: str = "xla"  # "xla" | "cudnn" (fused, GPU bf16) | "jax"; see layers.dot_product_attention
  scan_layers: bool = False  # one nn.scan over the layers (params "layer", stacked); see layers.apply_blocks


class Embeddings(nn.Module):
  config: TextTowerConfig

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic):
    cfg = self.config
    prec = layers.tower_precision(cfg)

    def embed(num, name):
      return nn.Embed(
        num,
        cfg.hidden_size,
        dtype=prec.activations_dtype,
        param_dtype=jnp.float32,
        embedding_init=layers.with_axes(layers.normal_02, ("vocab", "embed")),
        name=name,
      )

    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (
      embed(cfg.vocab_size, "word_embeddings")(input_ids)
      + embed(cfg.max_len, "position_embeddings")(positions)
      + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
    )
    x = layers.LayerNorm(cfg.layer_norm_eps, prec, name="LayerNorm")(x)
    return layers.Dropout(cfg.dropout)(x, deterministic=deterministic)


class SelfAttention(nn.Module):
  config: TextTowerConfig

  @nn.compact
  def __call__(self, x, bias, deterministic):
    cfg = self.config
    prec = layers.tower_precision(cfg)
    head_dim = cfg.hidden_size // cfg.num_heads
    proj = lambda name: layers.dense((cfg.num_heads, head_dim), ("embed", "heads", "kv"), name=name, precision=prec)
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    q = layers.constrain(q, ("batch", "act_length", "act_heads", "act_kv"))
    dropout_rng = None
    if not deterministic and cfg.attention_dropout > 0:
      dropout_rng = self.make_rng("dropout")
    ctx = layers.dot_product_attention(
      q,
      k,
      v,
      bias,
      precision=prec,
      dropout_rng=dropout_rng,
      dropout_rate=cfg.attention_dropout,
      deterministic=deterministic,
      implementation=cfg.attention_impl,
    )
    return layers.dense(cfg.hidden_size, ("heads", "kv", "embed"), name="output", precision=prec, axis=(-2, -1))(ctx)


class BertLayer(nn.Module):
  config: TextTowerConfig

  @nn.compact
  def __call__(self, x, bias, deterministic):
    cfg = self.config
    prec = layers.tower_precision(cfg)
    if cfg.adapter_style not in ADAPTER_STYLES:
      raise ValueError(f"model.text.adapter_style={cfg.adapter_style!r}; expected one of {ADAPTER_STYLES}")
    alta = cfg.use_adapters and cfg.adapter_style == "alta"
    drop = layers.Dropout(cfg.dropout)
    attn = SelfAttention(cfg, name="attention")(x, bias, deterministic)
    x = layers.LayerNorm(cfg.layer_norm_eps, prec, name="attention_norm")(drop(attn, deterministic=deterministic) + x)
    if alta:
      alta_adapter = lambda name: layers.BottleneckAdapter(cfg.adapter_dim, cfg.adapter_init, prec, "gelu", name=name)
      x = x + alta_adapter("attn_adapter")(x)
    y = layers.dense(cfg.mlp_dim, ("embed", "mlp"), name="intermediate", precision=prec)(x)
    y = layers.gelu_exact(y)
    y = layers.constrain(y, ("batch", "act_length", "act_mlp"))
    y = layers.dense(cfg.hidden_size, ("mlp", "embed"), name="output", precision=prec)(y)
    y = drop(y, deterministic=deterministic)
    if alta:
      parallel = ALTA_MLP_ADAPTER_SCALE * alta_adapter("mlp_adapter")(x)
      x = layers.LayerNorm(cfg.layer_norm_eps, prec, name="output_norm")(y + x) + parallel
    else:
      if cfg.use_adapters:
        residual = y
        lang = layers.BottleneckAdapter(cfg.adapter_dim, cfg.adapter_init, prec, name="language_adapter")(y) + residual
        y = layers.BottleneckAdapter(cfg.adapter_dim, cfg.adapter_init, prec, name="task_adapter")(lang) + residual
      x = layers.LayerNorm(cfg.layer_norm_eps, prec, name="output_norm")(y + x)
    x = layers.constrain(x, ("batch", "act_length", "act_embed"))
    return layers.residual_grad_barrier(x) if cfg.residual_grad_barrier else x


class TextTower(nn.Module):
  """__call__(input_ids [B, T], attention_mask [B, T]) -> last hidden state [B, T, h]."""

  config: TextTowerConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic=True):
    cfg = self.config
    prec = layers.tower_precision(cfg)
    if input_ids.shape[1] > cfg.max_len:
      raise ValueError(f"sequence length {input_ids.shape[1]} exceeds model.text.max_len={cfg.max_len}")
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = Embeddings(cfg, name="embeddings")(input_ids, token_type_ids, deterministic)
    if cfg.invertible_adapter:
      x = InvertibleAdapter(cfg.adapter_init, prec, name="invertible_adapter")(x)
    x = layers.constrain(x, ("batch", "act_length", "act_embed"))
    bias = layers.mask_to_bias(attention_mask)
    return layers.apply_blocks(BertLayer, cfg, x, bias, deterministic, name=LAYERS, static_argnums=(3,))
