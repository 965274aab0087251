"""Mixed-precision policies: resolution, the mixed einsum and its gradient, the whole model under each policy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clinvla_jax import api, losses
from clinvla_jax.config import load_config
from clinvla_jax.model import layers
from clinvla_jax.model.bert import TextTowerConfig
from clinvla_jax.model.clinvla import matmul_ready_params, resolve_precision

BF16_OUT32 = layers.POLICIES["bf16_fp32_out"]


def test_named_policies_and_specs():
  assert layers.precision_policy("float32") == layers.Precision()
  p = layers.precision_policy("bf16_fp32_out")
  assert (p.matmul, p.products, p.activations, p.params) == ("bfloat16", "float32", "float32", "float32")
  p = layers.precision_policy("bfloat16")
  assert (p.matmul, p.products, p.activations, p.params) == ("bfloat16",) * 3 + ("float32",)
  custom = layers.precision_policy("matmul=bfloat16, activations=bfloat16")
  assert (custom.matmul, custom.products, custom.activations) == ("bfloat16", "float32", "bfloat16")
  for bad in ("bf16", "matmul=int8", "params=bfloat16"):
    with pytest.raises(ValueError, match="precision"):
      layers.precision_policy(bad)


def test_auto_follows_the_backend_and_the_cpu(monkeypatch):
  assert layers.auto_precision_name("gpu") == "bfloat16"
  assert layers.auto_precision_name("tpu") == "bfloat16"
  monkeypatch.setattr(layers, "cpu_has_fast_bf16", lambda: True)
  assert layers.auto_precision_name("cpu") == "bf16_fp32_out"
  monkeypatch.setattr(layers, "cpu_has_fast_bf16", lambda: False)
  assert layers.auto_precision_name("cpu") == "float32"
  assert layers.precision_policy("auto", backend="cpu").name == "float32"


def test_most_specific_setting_wins():
  tower = TextTowerConfig()
  assert resolve_precision(None, tower) == "float32"
  assert resolve_precision("bfloat16", tower) == "bfloat16"
  legacy = TextTowerConfig(dtype="bfloat16")
  assert resolve_precision("float32", legacy) == "bfloat16"
  own = TextTowerConfig(dtype="bfloat16", precision="bf16_fp32_out")
  assert resolve_precision("float32", own) == "bf16_fp32_out"
  assert resolve_precision("auto", tower) == layers.auto_precision_name()


def test_configs_choose_their_policy():
  assert api.model_config(load_config("configs/tiny.py")).image.precision == "float32"
  base = api.model_config(load_config("configs/base.py"))
  assert base.image.precision == base.text.precision == layers.auto_precision_name()
  cfg = load_config("configs/tiny.py", {"model.precision": "bf16_fp32_out", "model.text.precision": "float32"})
  mcfg = api.model_config(cfg)
  assert (mcfg.image.precision, mcfg.text.precision) == ("bf16_fp32_out", "float32")


SPECS = [
  ("...a,as->...s", (3, 5, 24), (24, 8)),
  ("...ab,abs->...s", (3, 5, 2, 12), (2, 12, 8)),
  ("...a,ast->...st", (3, 5, 24), (24, 2, 4)),
  ("bqhd,bkhd->bhqk", (2, 5, 3, 8), (2, 7, 3, 8)),
  ("bhqk,bkhd->bqhd", (2, 3, 5, 7), (2, 7, 3, 8)),
]


@pytest.mark.parametrize("spec,x_shape,y_shape", SPECS)
def test_mixed_einsum_and_its_gradient(spec, x_shape, y_shape):
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(*x_shape), jnp.float32)
  y = jnp.asarray(rng.randn(*y_shape), jnp.float32)
  w = jnp.asarray(rng.randn(*jnp.einsum(spec, x, y).shape), jnp.float32)
  rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)

  out = layers.einsum(spec, x, y, BF16_OUT32)
  assert out.dtype == jnp.float32
  # The products of bf16-rounded operands, accumulated in float32.
  np.testing.assert_allclose(out, jnp.einsum(spec, rounded(x), rounded(y)), rtol=1e-5, atol=1e-5)

  gx, gy = jax.grad(lambda a, b: jnp.sum(w * layers.einsum(spec, a, b, BF16_OUT32)), (0, 1))(x, y)
  assert gx.dtype == gy.dtype == jnp.float32
  # The reference: the gradient of the rounded products with the cotangent rounded too.
  ref_x, ref_y = jax.grad(lambda a, b: jnp.sum(rounded(w) * jnp.einsum(spec, a, b)), (0, 1))(rounded(x), rounded(y))
  np.testing.assert_allclose(gx, ref_x, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(gy, ref_y, rtol=1e-4, atol=1e-4)


def _dot_operand_types(hlo: str) -> list[str]:
  # "stablehlo.dot_general %a, %b, ... : (tensor<4x8xbf16>, tensor<8x3xbf16>) -> tensor<4x3xf32>"
  return re.findall(r"stablehlo\.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)", hlo)


def test_backward_products_take_bf16_operands():
  """JAX's own transpose would multiply the f32 cotangent with upcast operands (the slow f32 path)."""

  def loss(x, w1, w2):
    h = layers.einsum("...a,as->...s", x, w1, BF16_OUT32)
    return jnp.sum(jnp.tanh(layers.einsum("...s,st->...t", h, w2, BF16_OUT32)))

  args = (jnp.ones((4, 6, 16)), jnp.ones((16, 32)), jnp.ones((32, 8)))
  hlo = jax.jit(jax.grad(loss, (0, 1, 2))).lower(*args).as_text()
  operands = _dot_operand_types(hlo)
  assert len(operands) == 6, operands  # two forward, four backward products
  assert all(a.endswith("xbf16>") and b.endswith("xbf16>") for a, b in operands), operands


def _inputs(mcfg, batch=4):
  rng = np.random.RandomState(0)
  inp = api.dummy_inputs(mcfg, batch=batch)
  inp["patches"] = jnp.asarray(rng.randint(0, 256, inp["patches"].shape), jnp.uint8)
  inp["input_ids"] = jnp.asarray(rng.randint(1000, 30000, inp["input_ids"].shape), jnp.int32)
  return inp


# Non-zero adapters ("bert" init) and one layer per tower: a policy casts every layer alike, and each
# extra layer adds a full-model gradient to compile twice (fp32 and the policy).
POLICY_MODEL = {
  "model.image.adapter_init": "bert",
  "model.text.adapter_init": "bert",
  "model.image.num_layers": 1,
  "model.text.num_layers": 1,
}


@pytest.fixture(scope="module")
def fp32_reference():
  cfg = load_config("configs/tiny.py", POLICY_MODEL)
  variables = api.init_params(cfg, jax.random.key(0))
  inp = _inputs(api.model_config(cfg))
  return cfg, variables, inp, _run(cfg, variables, inp)


def _run(cfg, variables, inp):
  model = api.build_model(cfg)

  def loss_fn(v):
    out = model.apply(v, *inp.values())
    return losses.clinvla_loss(out, cfg.loss)[0], out

  (loss, out), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables)
  return out, float(loss), grads


def _flat(tree):
  # On the host: eager jnp ops would compile once per leaf shape.
  return np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree_util.tree_leaves(tree)])


def _cosines(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.sum(a * b, -1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# The full tier: two full-model gradients to compile (about 30 s).  The default tier checks the policies'
# products and their gradients on single einsums above, and a bfloat16 forward in test_model.py.
@pytest.mark.slow
@pytest.mark.parametrize("policy,activation_dtype", [("bf16_fp32_out", jnp.float32), ("bfloat16", jnp.bfloat16)])
def test_model_under_a_policy_stays_close_to_fp32(fp32_reference, policy, activation_dtype):
  cfg32, variables, inp, (ref, ref_loss, ref_grads) = fp32_reference
  cfg = load_config("configs/tiny.py", {**POLICY_MODEL, "model.precision": policy})
  out, loss, grads = _run(cfg, variables, inp)
  for tower in ("image", "text"):
    assert out[tower]["hidden"].dtype == activation_dtype
    assert out[tower]["global"].dtype == out[tower]["local"].dtype == jnp.float32
    assert _cosines(out[tower]["global"], ref[tower]["global"]).min() > 0.999, tower
  assert abs(loss - ref_loss) < 0.02 * abs(ref_loss)
  # Parameters and their gradients stay float32 under every policy.
  assert all(g.dtype == jnp.float32 for g in jax.tree_util.tree_leaves(grads))
  g, g32 = _flat(grads), _flat(ref_grads)
  assert float(g @ g32 / (np.linalg.norm(g) * np.linalg.norm(g32))) > 0.995


def test_parameters_are_float32_under_every_policy():
  for policy in ("bf16_fp32_out", "bfloat16"):
    # The initialisation's output dtypes, traced (the values do not matter here).
    params = api.abstract_params(load_config("configs/tiny.py", {"model.precision": policy}), boxed=False)
    assert {x.dtype for x in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}


def test_matmul_ready_params_cast_only_kernels_of_16_bit_towers():
  cfg = load_config("configs/tiny.py", {"model.image.precision": "bf16_fp32_out"})
  mcfg = api.model_config(cfg)
  variables = api.init_params(cfg, jax.random.key(0))
  ready = matmul_ready_params(variables, mcfg)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ready)}
  qkv = flat["['params']['image_tower']['blocks_0']['attn']['qkv']['kernel']"]
  assert qkv.dtype == jnp.bfloat16
  assert flat["['params']['image_global_head']['dense1']['kernel']"].dtype == jnp.bfloat16
  # The patch embedding (summed over channels first), norms, biases, tokens and
  # the float32 text tower are untouched.
  assert flat["['params']['image_tower']['patch_embed_kernel']"].dtype == jnp.float32
  assert flat["['params']['image_tower']['blocks_0']['norm1']['scale']"].dtype == jnp.float32
  assert flat["['params']['image_tower']['blocks_0']['attn']['qkv']['bias']"].dtype == jnp.float32
  assert flat["['params']['text_tower']['layer_0']['intermediate']['kernel']"].dtype == jnp.float32
  # The model gives the same result from either tree (it casts at use otherwise).
  inp = _inputs(mcfg)
  model = api.build_model(cfg)
  a = jax.jit(model.apply)(variables, *inp.values())["image"]["global"]
  b = jax.jit(model.apply)(ready, *inp.values())["image"]["global"]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
