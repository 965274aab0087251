"""Building blocks shared by the image and text towers.

Every parameter is created through ``param_with_axes`` style initialisers
(``nn.with_logical_partitioning``) so that the sharding rules in the config can
place it on a mesh by name; activations are annotated with logical names too.
Logical axis names used in this package:

  parameters:   embed, mlp, heads, kv, vocab, patch, adapter, proj; layers (the
                leading axis of the stacked blocks under ``scan_layers``)
  activations:  batch, act_length, act_embed, act_mlp, act_heads, act_kv

Parameters and activations have separate names so that FSDP can shard a
parameter's ``embed`` dimension over the same mesh axis that splits the batch.
"""

from __future__ import annotations


import dataclasses
import functools
import re
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


@dataclasses.dataclass(frozen=True)
class Precision:
  """The dtypes of a mixed-precision policy (dtype names, so the policy hashes and prints).

  matmul: both operands of every dense layer, einsum and attention product are cast to it.
  products: what those products accumulate into and return (``preferred_element_type``).
  activations: what flows between layers: embeddings, the residual stream, the outputs of
    dense layers and LayerNorms.
  params: the stored (and optimised) parameters; float32 under every policy, so the
    optimiser state and the checkpoints do not depend on the policy.

  Softmax, LayerNorm statistics, the L2 normalisation of embeddings and the losses run in
  float32 under every policy.
  """

  name: str = "float32"
  matmul: str = "float32"
  products: str = "float32"
  activations: str = "float32"
  params: str = "float32"

  @property
  def matmul_dtype(self) -> Dtype:
    return as_dtype(self.matmul)

  @property
  def products_dtype(self) -> Dtype:
    return as_dtype(self.products)

  @property
  def activations_dtype(self) -> Dtype:
    return as_dtype(self.activations)

  def describe(self) -> str:
    return (
      f"{self.name} (matmul operands {self.matmul}, products {self.products}, "
      f"activations {self.activations}, parameters {self.params})"
    )


# Named policies.  XLA:CPU runs a bf16 x bf16 product fast only when it returns
# float32 (AMX / AVX512-BF16 kernels accumulate in float32; asking for a bf16
# result takes a slower path than float32 itself), hence "bf16_fp32_out" for
# CPUs.  GPU tensor cores and TPU MXUs accumulate bf16 products in float32
# whatever the result dtype, so there a bf16 result and bf16 activations halve
# the memory traffic at no cost in accumulation.
POLICIES = {
  "float32": Precision("float32"),
  "bf16_fp32_out": Precision("bf16_fp32_out", matmul="bfloat16"),
  "bfloat16": Precision("bfloat16", matmul="bfloat16", products="bfloat16", activations="bfloat16"),
  "float16": Precision("float16", matmul="float16", products="float16", activations="float16"),
}
PRECISION_NAMES = ("auto", *POLICIES)


def cpu_has_fast_bf16() -> bool:
  """Whether this CPU multiplies bf16 in hardware (AMX-BF16 or AVX512-BF16; Linux flags)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("flags"):
          flags = set(line.split(":", 1)[1].split())
          return bool({"amx_bf16", "avx512_bf16"} & flags)
  except OSError:
    pass
  return False


def auto_precision_name(backend: Optional[str] = None) -> str:
  """The policy "auto" stands for on ``backend`` (default: JAX's default backend)."""
  backend = backend or jax.default_backend()
  if backend == "cpu":
    # Without bf16 hardware XLA:CPU emulates bf16 products, slower than float32.
    return "bf16_fp32_out" if cpu_has_fast_bf16() else "float32"
  return "bfloat16"


def precision_policy(spec: str | Precision, backend: Optional[str] = None) -> Precision:
  """A ``Precision`` from a policy name, "auto", or "matmul=bfloat16,products=float32,...".

  The key=value form starts from float32 and sets the named fields (``matmul``,
  ``products``, ``activations``); parameters stay float32.
  """
  if isinstance(spec, Precision):
    return spec
  spec = str(spec).strip()
  if spec == "auto":
    return POLICIES[auto_precision_name(backend)]
  if spec in POLICIES:
    return POLICIES[spec]
  if "=" in spec:
    fields = {}
    for item in filter(None, re.split(r"[,\s]+", spec)):
      key, _, value = item.partition("=")
      if key not in ("matmul", "products", "activations") or value not in _DTYPES:
        raise ValueError(f"precision {spec!r}: {item!r} is not matmul|products|activations={'|'.join(_DTYPES)}")
      fields[key] = value
    return Precision(name=spec, **fields)
  raise ValueError(
    f"unknown precision {spec!r}; expected one of {PRECISION_NAMES} or 'matmul=...,products=...,activations=...'"
  )


def tower_precision(tower_config) -> Precision:
  """The policy of a tower config: its ``precision`` spec, else the legacy ``dtype``'s."""
  return precision_policy(getattr(tower_config, "precision", "") or tower_config.dtype)


def einsum(spec: str, x: jax.Array, y: jax.Array, precision: Precision) -> jax.Array:
  """``jnp.einsum`` under a precision policy: operands in ``matmul``, result in ``products``.

  When the two differ (bf16 operands, float32 products) the backward pass is
  written out too: JAX's own transpose would multiply the float32 cotangent
  with the upcast operand, i.e. run every gradient product on the float32 path.
  Here the cotangent is cast to the operand dtype and the products return
  float32 again, so the backward runs as fast as the forward; the residuals
  saved for it are the bf16 operands (half the memory of float32 ones).
  """
  if precision.matmul == precision.products:
    dtype = precision.matmul_dtype
    return jnp.einsum(spec, x.astype(dtype), y.astype(dtype))
  return _mixed_einsum(
    spec, precision.matmul_dtype, precision.products_dtype, jnp.dtype(x.dtype), jnp.dtype(y.dtype), x, y
  )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def _mixed_einsum(spec, operand_dtype, product_dtype, x_dtype, y_dtype, x, y):
  del x_dtype, y_dtype
  return jnp.einsum(spec, x.astype(operand_dtype), y.astype(operand_dtype), preferred_element_type=product_dtype)


def _mixed_einsum_fwd(spec, operand_dtype, product_dtype, x_dtype, y_dtype, x, y):
  del x_dtype, y_dtype
  x, y = x.astype(operand_dtype), y.astype(operand_dtype)
  return jnp.einsum(spec, x, y, preferred_element_type=product_dtype), (x, y)


def _mixed_einsum_bwd(spec, operand_dtype, product_dtype, x_dtype, y_dtype, residuals, g):
  x, y = residuals
  lhs, rest = spec.replace(" ", "").split(",")
  rhs, out = rest.split("->")
  g = g.astype(operand_dtype)
  # Every index of one operand appears in the other operand or in the output
  # (true of dense layers and attention), so each gradient is one more einsum.
  dx = _product(out, g, rhs, y, lhs, product_dtype)
  dy = _product(lhs, x, out, g, rhs, product_dtype)
  return dx.astype(x_dtype), dy.astype(y_dtype)


def _indices(spec: str) -> list[str]:
  return ["..."] + list(spec[3:]) if spec.startswith("...") else list(spec)


def _product(a_spec, a, b_spec, b, out_spec, product_dtype):
  """``einsum(a_spec,b_spec->out_spec)`` with the operand whose own indices come first in the output first.

  XLA:CPU has no bf16 x bf16 -> f32 kernel for a product whose result it would
  have to transpose (e.g. "bqhd,bhqk->bkhd" fails at run time while
  "bhqk,bqhd->bkhd" runs); putting first the operand whose free indices lead in
  the output gives the layout it supports.
  """
  out = _indices(out_spec)

  def first_free(own, other):
    free = [out.index(i) for i in _indices(own) if i in out and i not in _indices(other)]
    return min(free, default=len(out))

  if first_free(b_spec, a_spec) < first_free(a_spec, b_spec):
    a_spec, a, b_spec, b = b_spec, b, a_spec, a
  return jnp.einsum(f"{a_spec},{b_spec}->{out_spec}", a, b, preferred_element_type=product_dtype)


_mixed_einsum.defvjp(_mixed_einsum_fwd, _mixed_einsum_bwd)


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
  decisions (a conditional there would cost a host round trip), so the towers
  call this only where ``model.residual_grad_barrier`` (default "auto": on
  CPU) says so.
  """
  return _materialised_grad(x)


GRAD_BARRIER_SETTINGS = ("auto", "on", "off")


def grad_barrier_enabled(setting: str, backend: Optional[str] = None) -> bool:
  """``model.residual_grad_barrier``: "on", "off", or "auto" (on for the CPU backend only)."""
  if setting not in GRAD_BARRIER_SETTINGS:
    raise ValueError(f"residual_grad_barrier={setting!r}; expected one of {GRAD_BARRIER_SETTINGS}")
  if setting == "auto":
    return (backend or jax.default_backend()) == "cpu"
  return setting == "on"


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
  """LayerNorm with named parameters; statistics always in float32, output in the activation dtype."""

  eps: float
  precision: Precision = Precision()

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param("scale", with_axes(nn.initializers.ones, ("embed",)), (features,), jnp.float32)
    bias = self.param("bias", with_axes(nn.initializers.zeros, ("embed",)), (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
    return y.astype(self.precision.activations_dtype)


class DenseGeneral(nn.Module):
  """A dense layer over the last ``len(in_axes)`` input dimensions.

  Unlike ``nn.DenseGeneral`` the kernel is created in its final shape
  ([*inputs, *features]), so its logical axis names always match its rank, also
  when Flax re-evaluates initialisers to check shapes under sharding rules.
  """

  features: Tuple[int, ...]
  axes: Tuple[Optional[str], ...]
  num_in: int = 1
  precision: Precision = Precision()
  kernel_init: Initializer = normal_02
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    in_shape = x.shape[-self.num_in :]
    kernel = self.param(
      "kernel", with_axes(self.kernel_init, self.axes), tuple(in_shape) + tuple(self.features), jnp.float32
    )
    in_letters = "abcdefgh"[: self.num_in]
    out_letters = "stuvw"[: len(self.features)]
    y = einsum(f"...{in_letters},{in_letters}{out_letters}->...{out_letters}", x, kernel, self.precision)
    if self.use_bias:
      bias = self.param(
        "bias", with_axes(nn.initializers.zeros, self.axes[-len(self.features) :]), tuple(self.features), jnp.float32
      )
      y = y + bias.astype(y.dtype)
    return y.astype(self.precision.activations_dtype)


def dense(features, axes, *, name, precision: Precision, kernel_init=normal_02, use_bias=True, axis=-1):
  """Dense layer with logical axes on kernel and bias.

  ``axes`` names the kernel dimensions (inputs then outputs); the bias takes the
  output part.  ``axis`` is -1 or a tuple of trailing input axes, e.g. (-2, -1).
  """
  features = (features,) if isinstance(features, int) else tuple(features)
  num_in = 1 if isinstance(axis, int) else len(axis)
  return DenseGeneral(
    features=features,
    axes=tuple(axes),
    num_in=num_in,
    precision=precision,
    kernel_init=kernel_init,
    use_bias=use_bias,
    name=name,
  )


ATTENTION_IMPLS = ("xla", "cudnn", "jax")


def dot_product_attention(
  q,
  k,
  v,
  bias,
  *,
  precision: Precision,
  dropout_rng=None,
  dropout_rate=0.0,
  deterministic=True,
  implementation: str = "xla",
):
  """Multi-head attention core.

  q: [B, Q, H, D]; k, v: [B, K, H, D]; bias: additive, broadcastable to
  [B, H, Q, K] (0 for visible keys, a large negative number for hidden ones).
  The logits and the softmax are float32 under every policy; both products take
  their operands in ``precision.matmul``; the output is in the activation dtype.

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
  dtype = precision.matmul_dtype
  if implementation == "cudnn" and (dtype == jnp.float32 or jax.default_backend() != "gpu"):
    fused_ok = False  # cuDNN's kernel needs a GPU and 16-bit inputs
  if implementation != "xla" and fused_ok:
    q, k, v = q.astype(dtype), k.astype(dtype), v.astype(dtype)
    if implementation == "cudnn":
      lengths = None
      if bias is not None:
        lengths = jnp.sum(bias.reshape(bias.shape[0], -1) == 0, axis=-1).astype(jnp.int32)
      out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    else:
      out = jax.nn.dot_product_attention(q, k, v, bias=bias)
    return out.astype(precision.activations_dtype)
  depth = q.shape[-1]
  q = q * jnp.asarray(depth**-0.5, q.dtype)
  logits = einsum("bqhd,bkhd->bhqk", q, k, dataclasses.replace(precision, products="float32"))
  if bias is not None:
    logits = logits + bias
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout_active:
    keep, scale = dropout_keep_mask(dropout_rng, dropout_rate, weights.shape)
    weights = jnp.where(keep, weights * scale, 0.0)
  return einsum("bhqk,bkhd->bqhd", weights, v, precision).astype(precision.activations_dtype)


def dropout_keep_mask(rng: jax.Array, rate: float, shape) -> Tuple[jax.Array, float]:
  """(keep mask, scale) of inverted dropout, drawn from 16 random bits per element.

  ``jax.random.bernoulli`` draws 32 bits per element; on CPU the random bits of
  the text tower's dropout took 6 % of the base train step
  (benchmarks/profile_step.py), and 16-bit draws halve that.  The keep
  probability is quantised to multiples of 2**-16 and the scale is its exact
  inverse, so the expectation is unchanged.
  """
  threshold = int(round((1.0 - rate) * 65536))
  if not 0 < threshold <= 65536:
    raise ValueError(f"dropout rate {rate} keeps nothing")
  if threshold == 65536:
    return jnp.ones(shape, bool), 1.0
  keep = jax.random.bits(rng, shape, jnp.uint16) < jnp.uint16(threshold)
  return keep, 65536.0 / threshold


class Dropout(nn.Module):
  """Inverted dropout (``nn.Dropout``'s interface) with 16-bit random draws (``dropout_keep_mask``)."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep, scale = dropout_keep_mask(self.make_rng("dropout"), self.rate, x.shape)
    return jnp.where(keep, x * jnp.asarray(scale, x.dtype), jnp.zeros((), x.dtype))


def mask_to_bias(mask: jax.Array) -> jax.Array:
  """[B, K] 1/0 key mask -> additive bias [B, 1, 1, K] in float32."""
  return jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)


ADAPTER_ACTIVATIONS = ("relu", "gelu")


class BottleneckAdapter(nn.Module):
  """h -> down(d) -> ReLU (or exact GELU) -> up(h), without its own residual (callers add it).

  init: "identity" zero-initialises the up-projection so that the adapted
  network starts exactly as the pretrained one; "bert" draws every weight from
  N(0, 0.02); "he" uses He-normal weights (the paper's Algorithm 1).
  activation: "relu" (MAD-X, the paper) or "gelu" (ALTA's adapters).
  """

  bottleneck: int
  init_scheme: str = "identity"
  precision: Precision = Precision()
  activation: str = "relu"

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    down_init, up_init = adapter_initializers(self.init_scheme)
    y = dense(self.bottleneck, ("embed", "adapter"), name="down", precision=self.precision, kernel_init=down_init)(x)
    if self.activation == "relu":
      y = nn.relu(y)
    elif self.activation == "gelu":
      y = gelu_exact(y)
    else:
      raise ValueError(f"adapter activation {self.activation!r}; expected one of {ADAPTER_ACTIVATIONS}")
    return dense(features, ("adapter", "embed"), name="up", precision=self.precision, kernel_init=up_init)(y)


def adapter_initializers(init: str):
  if init == "identity":
    return normal_02, nn.initializers.zeros
  if init == "bert":
    return normal_02, normal_02
  if init == "he":
    he = nn.initializers.he_normal()
    return he, he
  raise ValueError(f"Unknown adapter init {init!r}; expected 'identity', 'bert' or 'he'.")


# Named rematerialisation policies for the transformer blocks (``remat_policy``).
#   none: save every activation the backward needs (fastest, most memory).
#   full: save only the block inputs and recompute the rest in the backward,
#     about one extra forward for O(layers) activation memory.
#   dots: save the results of matrix products, recompute the elementwise work
#     (GELU, LayerNorm, softmax) - most of the memory saving of "full" at a
#     fraction of its recompute on accelerators.
#   dots_no_batch: save only products without batch dimensions (the dense
#     layers), recompute attention's batched products as well.
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_saveable,
  "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy_name(tower_config) -> str:
  """A tower's policy: ``remat_policy`` when set, else the older bool ``remat`` (True = "full")."""
  name = getattr(tower_config, "remat_policy", "") or ("full" if tower_config.remat else "none")
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={name!r}; expected one of {tuple(REMAT_POLICIES)}")
  return name


def maybe_remat(module_cls, policy: str, static_argnums=(), prevent_cse: bool = True):
  """``module_cls`` under the named remat policy (``REMAT_POLICIES``); "none" returns it unchanged."""
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={policy!r}; expected one of {tuple(REMAT_POLICIES)}")
  if policy == "none":
    return module_cls
  return nn.remat(module_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums, prevent_cse=prevent_cse)


# The logical name of the leading axis that ``scan_layers`` adds to every block parameter.
LAYERS_AXIS = "layers"


@functools.lru_cache(maxsize=None)
def _carry_only(module_cls):
  """``module_cls`` whose ``__call__`` returns ``(output, None)``: the (carry, ys) pair ``nn.scan`` expects."""

  class Scanned(module_cls):
    def __call__(self, x, *args):
      return super().__call__(x, *args), None

  # The class name is what Flax prints in errors and tabulations: keep the block's own.
  Scanned.__name__ = Scanned.__qualname__ = module_cls.__name__
  return Scanned


def apply_blocks(block_cls, tower_config, x, *args, name: str, static_argnums=()):
  """Runs ``tower_config.num_layers`` blocks ``block_cls(tower_config)(x, *args) -> x``; call from a compact method.

  Loop layout (``scan_layers`` False): one module per block, named ``{name}_{i}``.
  Scan layout: one ``nn.scan`` module named ``name`` whose parameters carry a
  leading axis of length ``num_layers`` (logical name ``LAYERS_AXIS``), so the
  block is traced and compiled once instead of once per layer.  Both run the
  same function of the same weights (``clinvla_jax.convert.stack_layers`` moves
  a tree between them).  ``args`` are passed unchanged to every block;
  ``static_argnums`` counts ``self`` as 0, as ``nn.remat`` does.
  """
  policy = remat_policy_name(tower_config)
  if not getattr(tower_config, "scan_layers", False):
    block = maybe_remat(block_cls, policy, static_argnums=static_argnums)
    for i in range(tower_config.num_layers):
      x = block(tower_config, name=f"{name}_{i}")(x, *args)
    return x
  # Remat goes inside the scanned body, so the backward recomputes one block at
  # a time.  Scan already keeps XLA from merging the recomputation with the
  # forward, which is all prevent_cse guards against.
  body = maybe_remat(_carry_only(block_cls), policy, static_argnums=static_argnums, prevent_cse=False)
  stack = nn.scan(
    body,
    variable_axes={"params": 0},
    # Each block draws its own initial weights and dropout masks, as every block does in the loop layout.
    split_rngs={"params": True, "dropout": True},
    in_axes=nn.broadcast,
    length=tower_config.num_layers,
    metadata_params={nn.PARTITION_NAME: LAYERS_AXIS},
  )
  x, _ = stack(tower_config, name=name)(x, *args)
  return x


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def as_dtype(name: str) -> Dtype:
  return _DTYPES[name]
