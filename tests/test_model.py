"""Model behaviour: adapters, masking, missing views, ablations, precision options."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clinvla_jax import api
from clinvla_jax.config import load_config
from clinvla_jax.model import layers
from clinvla_jax.model.adapters import InvertibleAdapter


@pytest.fixture(scope="module")
def tiny():
  cfg = load_config("configs/tiny.py")
  return cfg, api.init_params(cfg, jax.random.key(0))


def _batch(cfg, seed=0, batch=2, kept=49):
  rng = np.random.RandomState(seed)
  idx = np.stack([np.stack([np.sort(rng.choice(196, kept, replace=False)) for _ in range(4)]) for _ in range(batch)])
  return dict(
    patches=rng.randint(0, 256, size=(batch, 4, kept, 256)).astype(np.uint8),
    patch_idx=idx.astype(np.int32),
    view_valid=np.ones((batch, 4), bool),
    input_ids=rng.randint(1000, 2000, size=(batch, cfg.model.text.max_len)).astype(np.int32),
    attention_mask=(np.arange(cfg.model.text.max_len)[None] < np.array([[20], [9]])[:batch]).astype(np.int32),
  )


@pytest.mark.parametrize("init", ["identity", "bert", "he"])
def test_invertible_adapter_inverse(init):
  module = InvertibleAdapter(init_scheme=init)
  x = jax.random.normal(jax.random.key(1), (3, 7, 64)) * 2.0
  variables = module.init(jax.random.key(2), x)
  y = module.apply(variables, x)
  x_back = module.apply(variables, y, method=InvertibleAdapter.inverse)
  rel = float(jnp.max(jnp.abs(x_back - x)) / jnp.max(jnp.abs(x)))
  assert rel <= 1e-5
  if init == "identity":
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
  else:
    assert float(jnp.max(jnp.abs(y - x))) > 1e-2


def test_all_patches_in_order_equal_unmasked_forward(tiny):
  cfg, variables = tiny
  images = np.random.RandomState(0).randint(0, 256, size=(2, 1, 224, 224)).astype(np.uint8)
  full = api.encode_images(cfg, variables, images)
  patches, idx = api.patchify(images, 16)
  via_patches = api.encode_images(
    cfg,
    variables,
    np.asarray(patches),
    view_valid=np.ones((2, 1), bool),
    patch_idx=np.broadcast_to(np.asarray(idx), (2, 1, 196)),
  )
  np.testing.assert_array_equal(np.asarray(full["hidden"]), np.asarray(via_patches["hidden"]))
  assert full["hidden"].shape == (2, 1, 197, cfg.model.image.hidden_size)


def test_kept_subset_equals_gathered_inputs():
  # With no transformer layers the tower output is LayerNorm(token input), so a
  # masked forward must equal the full forward gathered at the kept indices.
  cfg = load_config("configs/tiny.py", {"model.image.num_layers": 0})
  variables = api.init_params(cfg, jax.random.key(4))
  images = np.random.RandomState(1).randint(0, 256, size=(1, 1, 224, 224)).astype(np.uint8)
  full = np.asarray(api.encode_images(cfg, variables, images)["hidden"])[0, 0]
  patches, _ = api.patchify(images, 16)
  order = np.random.RandomState(2).permutation(196)[:49]  # unsorted on purpose
  sub = np.asarray(
    api.encode_images(
      cfg,
      variables,
      np.asarray(patches)[:, :, order],
      view_valid=np.ones((1, 1), bool),
      patch_idx=order[None, None].astype(np.int32),
    )["hidden"]
  )[0, 0]
  np.testing.assert_allclose(sub[1:], full[1 + order], atol=1e-5)
  np.testing.assert_allclose(sub[0], full[0], atol=1e-5)


def test_token_order_permutes_outputs(tiny):
  cfg, variables = tiny
  b = _batch(cfg, kept=49)
  perm = np.random.RandomState(3).permutation(49)
  out = api.encode_images(cfg, variables, b["patches"], b["view_valid"], b["patch_idx"])
  out_p = api.encode_images(cfg, variables, b["patches"][:, :, perm], b["view_valid"], b["patch_idx"][:, :, perm])
  np.testing.assert_allclose(
    np.asarray(out_p["hidden"])[:, :, 1:], np.asarray(out["hidden"])[:, :, 1:][:, :, perm], atol=1e-5
  )
  np.testing.assert_allclose(np.asarray(out_p["global"]), np.asarray(out["global"]), atol=1e-5)


def test_invalid_view_pixels_do_not_matter(tiny):
  cfg, variables = tiny
  b = _batch(cfg)
  b["view_valid"][0, 1] = False
  b["view_valid"][1, 2:] = False
  out = api.encode_images(cfg, variables, b["patches"], b["view_valid"], b["patch_idx"])
  changed = b["patches"].copy()
  changed[0, 1] = 255 - changed[0, 1]
  changed[1, 2:] = 0
  out2 = api.encode_images(cfg, variables, changed, b["view_valid"], b["patch_idx"])
  np.testing.assert_array_equal(np.asarray(out["global"]), np.asarray(out2["global"]))
  mask = np.asarray(out["local_mask"])
  assert mask.sum() == (4 * 2 - 3) * 49
  np.testing.assert_array_equal(np.asarray(out["local"])[mask], np.asarray(out2["local"])[mask])
  # ...while a valid view's pixels do matter.
  changed[0, 0] = 255 - changed[0, 0]
  out3 = api.encode_images(cfg, variables, changed, b["view_valid"], b["patch_idx"])
  assert np.abs(np.asarray(out3["global"])[0] - np.asarray(out["global"])[0]).max() > 1e-4


def test_ablations_drop_views():
  # The view switches change which views a model reads, not its parameters: one init serves all four
  # (apply refuses a missing or misshapen parameter, so a switch that changed them would fail here).
  variables = api.init_params(load_config("configs/tiny.py"), jax.random.key(0))
  for overrides, slots in (
    ({}, (0, 1, 2, 3)),
    ({"model.multiview": False}, (0, 2)),
    ({"model.multiview": False, "model.temporal": False}, (0,)),
    ({"model.temporal": False}, (0, 1)),
  ):
    cfg = load_config("configs/tiny.py", overrides)
    mcfg = api.model_config(cfg)
    assert mcfg.view_slots == slots
    b = _batch(cfg)
    apply = jax.jit(api.build_model(cfg).apply)  # one compile per config, both batches
    out = apply(variables, **b)
    assert out["image"]["hidden"].shape[1] == len(slots)
    # Frontal-only models ignore the lateral views entirely.
    if 1 not in slots:
      b2 = dict(b, patches=b["patches"].copy())
      b2["patches"][:, 1] = 0
      b2["patches"][:, 3] = 0
      out2 = apply(variables, **b2)
      np.testing.assert_array_equal(np.asarray(out["image"]["global"]), np.asarray(out2["image"]["global"]))


def test_ablation_switches_change_parameters():
  base = api.abstract_params(load_config("configs/tiny.py"), boxed=False)["params"]["text_tower"]
  no_adapt = api.abstract_params(load_config("configs/tiny.py", {"model.text.use_adapters": False}), boxed=False)[
    "params"
  ]["text_tower"]
  no_inv = api.abstract_params(load_config("configs/tiny.py", {"model.text.invertible_adapter": False}), boxed=False)[
    "params"
  ]["text_tower"]
  assert "language_adapter" in base["layer_0"] and "language_adapter" not in no_adapt["layer_0"]
  assert "invertible_adapter" in base and "invertible_adapter" not in no_inv


def test_text_outputs_and_local_mask(tiny):
  cfg, variables = tiny
  b = _batch(cfg)
  out = api.encode_text(cfg, variables, b["input_ids"], b["attention_mask"])
  assert out["global"].shape == (2, cfg.model.proj_dim)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out["global"]), axis=-1), 1.0, rtol=1e-5)
  mask = np.asarray(out["local_mask"])
  assert mask.sum(1).tolist() == [18, 7]  # real tokens minus [CLS] and [SEP]
  assert not mask[:, 0].any()


def test_padding_does_not_change_text_embeddings(tiny):
  cfg, variables = tiny
  b = _batch(cfg)
  out = api.encode_text(cfg, variables, b["input_ids"], b["attention_mask"])
  ids = b["input_ids"].copy()
  ids[b["attention_mask"] == 0] = 0
  out2 = api.encode_text(cfg, variables, ids, b["attention_mask"])
  np.testing.assert_allclose(np.asarray(out["global"]), np.asarray(out2["global"]), atol=1e-6)


def test_bf16_and_remat_close_to_fp32(tiny):
  cfg, variables = tiny
  b = _batch(cfg)
  ref = jax.jit(api.build_model(cfg).apply)(variables, **b)
  remat_cfg = load_config("configs/tiny.py", {"model.image.remat": True, "model.text.remat": True})
  out = jax.jit(api.build_model(remat_cfg).apply)(variables, **b)
  np.testing.assert_allclose(np.asarray(out["image"]["global"]), np.asarray(ref["image"]["global"]), atol=1e-6)
  bf16_cfg = load_config("configs/tiny.py", {"model.image.dtype": "bfloat16", "model.text.dtype": "bfloat16"})
  out = jax.jit(api.build_model(bf16_cfg).apply)(variables, **b)
  assert out["image"]["hidden"].dtype == jnp.bfloat16
  for tower in ("image", "text"):
    cos = np.sum(np.asarray(out[tower]["global"]) * np.asarray(ref[tower]["global"]), -1)
    assert cos.min() > 0.99, (tower, cos)


def test_parameters_carry_logical_axes():
  boxed = api.abstract_params(load_config("configs/tiny.py"))["params"]
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
  qkv = boxed["image_tower"]["blocks_0"]["attn"]["qkv"]["kernel"]
  assert qkv.names == ("embed", None, "heads", "kv")
  assert boxed["text_tower"]["layer_0"]["intermediate"]["kernel"].names == ("embed", "mlp")


def test_dropout_from_16_bit_draws_keeps_the_expectation():
  x = jnp.ones((64, 128, 96), jnp.float32)
  drop = layers.Dropout(0.1)
  y = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  kept = np.asarray(y) != 0
  # 786k draws: the kept share is 0.9 within a few standard errors (3.4e-4 each).
  assert abs(kept.mean() - 0.9) < 2e-3
  threshold = round(0.9 * 65536)
  np.testing.assert_allclose(np.asarray(y)[kept], 65536 / threshold, rtol=1e-6)
  assert abs(float(jnp.mean(y)) - 1.0) < 3e-3
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  again = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(3)})
  np.testing.assert_array_equal(again, y)
  other = drop.apply({}, x, deterministic=False, rngs={"dropout": jax.random.key(4)})
  assert np.mean((np.asarray(other) != 0) != kept) > 0.1


def _loss_and_grads(cfg, variables, batch):
  model = api.build_model(cfg)

  def loss(v):
    out = model.apply(v, **batch)
    return jnp.sum(out["image"]["global"] * out["text"]["global"]) + jnp.mean(out["image"]["local"] ** 2)

  return jax.jit(jax.value_and_grad(loss))(variables)


def _program(cfg):
  """What the variants change in the compiled program: each tower's remat policy and residual barrier."""
  mcfg = api.model_config(cfg)
  return tuple((layers.remat_policy_name(t), t.residual_grad_barrier) for t in (mcfg.image, mcfg.text))


@pytest.mark.slow
def test_named_remat_policies_and_grad_barrier_keep_the_gradients(tiny):
  cfg, variables = tiny
  b = _batch(cfg)
  ref_loss, ref_grads = _loss_and_grads(cfg, variables, b)
  variants = [{f"model.{t}.remat_policy": p for t in ("image", "text")} for p in layers.REMAT_POLICIES]
  variants += [{"model.residual_grad_barrier": s} for s in ("on", "off")]
  # A variant that resolves to the reference's program (policy "none"; the barrier "on" where it
  # is the backend's default) is the reference: compiled once.
  programs = {_program(cfg)}
  for overrides in variants:
    variant = load_config("configs/tiny.py", overrides)
    if _program(variant) in programs:
      continue
    programs.add(_program(variant))
    loss, grads = _loss_and_grads(variant, variables, b)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads)):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
  # Every named policy and both barrier settings were compared: 4 policies + the other barrier setting.
  assert len(programs) == len(layers.REMAT_POLICIES) + 1, programs


def test_remat_and_barrier_settings_resolve():
  base = api.model_config(load_config("configs/base.py"))
  assert base.image.residual_grad_barrier is (jax.default_backend() == "cpu")
  assert layers.grad_barrier_enabled("auto", backend="gpu") is False
  assert layers.grad_barrier_enabled("on", backend="gpu") is True
  with pytest.raises(ValueError, match="residual_grad_barrier"):
    layers.grad_barrier_enabled("yes")
  legacy = api.model_config(load_config("configs/tiny.py", {"model.image.remat": True}))
  assert layers.remat_policy_name(legacy.image) == "full" and layers.remat_policy_name(legacy.text) == "none"
  with pytest.raises(ValueError, match="remat_policy"):
    layers.remat_policy_name(dataclasses.replace(legacy.image, remat_policy="some"))
