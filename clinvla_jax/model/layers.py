"""Building blocks shared by the image and text towers.

Every parameter is created through ``param_with_axes`` style initialisers
(``nn.with_logical_partitioning``) so that the sharding rules in the config can
place it on a mesh by name; activations are annotated with logical names too.
Logical axis names used in this package:

  parameters:   embed, mlp, heads, kv, vocab, patch, adapter, proj
  activations:  batch, act_length, act_embed, act_mlp, act_heads, act_kv

Parameters and activations have separate names so that FSDP can shard a
parameter's ``embed`` dimension over the same mesh axis that splits the batch.
"""

from __future__ import annotations


from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

# Defaults of the peers whose weights we load: HF BERT uses N(0, 0.02) for
# every dense and embedding matrix; timm ViT uses a truncated normal of the
# same scale.
normal_02 = nn.initializers.normal(stddev=0.02)
trunc_normal_02 = nn.initializers.truncated_normal(stddev=0.02)


def with_axes(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint; a no-op outside a mesh / rules context."""
  return nn.with_logical_constraint(x, tuple(axes))


def residual_grad_barrier(x: jax.Array) -> jax.Array:
  """The identity, whose gradient is materialised before it flows into the block below.

  Called on the residual stream at the end of every transformer block.  On
  CPU, XLA otherwise fuses the residual gradient's chain of elementwise terms
  (one set per LayerNorm below) into each consumer and recomputes it there, so
  the work grows with the square of the depth: in the base train step such
  fusions took a quarter of the time (benchmarks/profile_step.py; 7.2 -> 5.4 s
  per step with the barrier, benchmarks/RESULTS.md).  XLA:CPU drops
  ``optimization_barrier`` before fusing, but does not fuse across a
  conditional, hence the conditional.  Other backends keep their own fusion
  decisions (a conditional there would cost a host round trip).
  """
  if jax.default_backend() != "cpu":
    return x
  return _materialised_grad(x)


@jax.custom_vjp
def _materialised_grad(x):
  return x


def _materialised_grad_fwd(x):
  return x, None


def _materialised_grad_bwd(_, g):
  # Both branches return g unchanged, so the predicate never matters; the
  # barrier in one of them only keeps XLA from merging the two into nothing.
  return (jax.lax.cond(g.reshape(-1)[0] > 0, lambda t: t, jax.lax.optimization_barrier, g),)


_materialised_grad.defvjp(_materialised_grad_fwd, _materialised_grad_bwd)


def gelu_exact(x: jax.Array) -> jax.Array:
  # Both peers (HF BERT "gelu" and timm nn.GELU) use the erf form, not tanh.
  return jax.nn.gelu(x, approximate=False)


class LayerNorm(nn.Module):
  """LayerNorm with named parameters; statistics always in float32."""
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", with_axes(nn.initializers.ones, ("embed",)), (features,), jnp.float32)
    bias = self.param("bias", with_axes(nn.initializers.zeros, ("embed",)), (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.dtype)


class DenseGeneral(nn.Module):
  """A dense layer over the last ``len(in_axes)`` input dimensions.

  Unlike ``nn.DenseGeneral`` the kernel is created in its final shape
  ([*inputs, *features]), so its logical axis names always match its rank, also
  when Flax re-evaluates initialisers to check shapes under sharding rules.
  """
  features: Tuple[int, ...]
  axes: Tuple[Optional[str], ...]
  num_in: int = 1
  dtype: Dtype = jnp.float32
  kernel_init: Initializer = normal_02
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.num_in:]
    kernel = self.param("kernel", with_axes(self.kernel_init, self.axes), tuple(in_shape) + tuple(self.features),
                        jnp.float32)
    in_letters = "abcdefgh"[:self.num_in]
    out_letters = "stuvw"[:len(self.features)]
    y = jnp.einsum(f"...{in_letters},{in_letters}{out_letters}->...{out_letters}", x.astype(self.dtype),
                   kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param("bias", with_axes(nn.initializers.zeros, self.axes[-len(self.features):]),
                        tuple(self.features), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


def dense(features, axes, *, name, dtype, kernel_init=normal_02, use_bias=True, axis=-1):
  """Dense layer with logical axes on kernel and bias.

  ``axes`` names the kernel dimensions (inputs then outputs); the bias takes the
  output part.  ``axis`` is -1 or a tuple of trailing input axes, e.g. (-2, -1).
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  num_in = 1 if isinstance(axis, int) else len(axis)
  return DenseGeneral(features=features, axes=tuple(axes), num_in=num_in, dtype=dtype, kernel_init=kernel_init,
                      use_bias=use_bias, name=name)


ATTENTION_IMPLS = ("xla", "cudnn", "jax")


def dot_product_attention(q, k, v, bias, *, dtype, dropout_rng=None, dropout_rate=0.0, deterministic=True,
                          implementation: str = "xla"):
  """Multi-head attention core.

  q: [B, Q, H, D]; k, v: [B, K, H, D]; bias: additive, broadcastable to
  [B, H, Q, K] (0 for visible keys, a large negative number for hidden ones).
  The softmax runs in float32 whatever the compute dtype.

  implementation: "xla" (explicit einsums + softmax, every platform, supports
  attention dropout); "cudnn" (``jax.nn.dot_product_attention``'s fused cuDNN
  kernel, GPU with bf16/fp16 only; a bias must come from ``mask_to_bias`` of a
  prefix mask, since it is passed to cuDNN as per-example key lengths);
  "jax" (``jax.nn.dot_product_attention`` choosing for itself).  The fused
  kernels have no dropout: with active attention dropout, and for "cudnn" with
  fp32 inputs or off a GPU, the "xla" path runs instead.
  """
  if implementation not in ATTENTION_IMPLS:
    raise ValueError(f"attention implementation {implementation!r}; expected one of {ATTENTION_IMPLS}")
  dropout_active = not deterministic and dropout_rate > 0.0
  fused_ok = not dropout_active
  if implementation == "cudnn" and (q.dtype == jnp.float32 or jax.default_backend() != "gpu"):
    fused_ok = False   # cuDNN's kernel needs a GPU and 16-bit inputs
  if implementation != "xla" and fused_ok:
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if implementation == "cudnn":
      lengths = None
      if bias is not None:
        lengths = jnp.sum(bias.reshape(bias.shape[0], -1) == 0, axis=-1).astype(jnp.int32)
      return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return jax.nn.dot_product_attention(q, k, v, bias=bias)
  depth = q.shape[-1]
  q = q * jnp.asarray(depth ** -0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout_active:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(dtype), v)


def mask_to_bias(mask: jax.Array) -> jax.Array:
  """[B, K] 1/0 key mask -> additive bias [B, 1, 1, K] in float32."""
  return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


class BottleneckAdapter(nn.Module):
  """h -> down(d) -> ReLU -> up(h), without its own residual (callers add it).

  init: "identity" zero-initialises the up-projection so that the adapted
  network starts exactly as the pretrained one; "bert" draws every weight from
  N(0, 0.02); "he" uses He-normal weights (the paper's Algorithm 1).
  """
  bottleneck: int
  init_scheme: str = "identity"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    down_init, up_init = adapter_initializers(self.init_scheme)
    y = dense(self.bottleneck, ("embed", "adapter"), name="down", dtype=self.dtype, kernel_init=down_init)(x)
    y = nn.relu(y)
    return dense(features, ("adapter", "embed"), name="up", dtype=self.dtype, kernel_init=up_init)(y)


def adapter_initializers(init: str):
  if init == "identity":
    return normal_02, nn.initializers.zeros
  if init == "bert":
    return normal_02, normal_02
  if init == "he":
    he = nn.initializers.he_normal()
    return he, he
  raise ValueError(f"Unknown adapter init {init!r}; expected 'identity', 'bert' or 'he'.")


def maybe_remat(module_cls, enabled: bool, static_argnums=()):
  if not enabled:
    return module_cls
  # Saving nothing but the block inputs: recompute activations in the backward
  # pass, trading about one extra forward for O(layers) activation memory.
  return nn.remat(module_cls, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=static_argnums)


def as_dtype(name: str) -> Dtype:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


