"""Sharded contrastive losses: equal to the dense form in value and gradient, sigmoid loss, memory, model parameter.

The dense form (one expression over the global batch) is the reference; the
sharded form runs when the losses are traced under a mesh whose batch axes
hold several devices (tests/conftest.py provides 8 simulated CPU devices).
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clinvla_jax import api, losses, optim, sharding
from clinvla_jax.config import load_config

BATCH, REGIONS, WORDS, DIM = 16, 7, 6, 5
INVALID = (5, 11, 12)  # padding rows: garbage features, valid = False
LOSS_PARAMETERS = {"gloria": ("temperatures",), "infonce": ("logit_scale",), "sigmoid": ("logit_scale", "logit_bias")}


def _mesh(shape):
  n = int(np.prod(shape))
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)), jax.devices()[:n])


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def problem():
  rng = np.random.RandomState(0)
  word_mask = rng.rand(BATCH, WORDS) > 0.3
  word_mask[3] = False  # a text with no real words
  region_mask = rng.rand(BATCH, REGIONS) > 0.2
  region_mask[7, :] = False  # an image whose views are all missing
  valid = np.ones(BATCH, bool)
  valid[list(INVALID)] = False
  features = {
    "words": rng.normal(size=(BATCH, WORDS, DIM)).astype(np.float32),
    "regions": rng.normal(size=(BATCH, REGIONS, DIM)).astype(np.float32),
    "temperatures": np.array([4.0, 5.0, 10.0], np.float32),
    "image": _unit(rng.normal(size=(BATCH, DIM))).astype(np.float32),
    "text": _unit(rng.normal(size=(BATCH, DIM))).astype(np.float32),
    "logit_scale": np.float32(2.3),
    "logit_bias": np.float32(-3.0),
  }
  return features, (word_mask, region_mask, valid)


def _all_losses(x, masks, batch_axes=None, chunk_size=2):
  word_mask, region_mask, valid = masks
  return {
    "gloria": losses.gloria_local_loss(
      x["words"],
      word_mask,
      x["regions"],
      region_mask,
      x["temperatures"],
      valid,
      chunk_size=chunk_size,
      batch_axes=batch_axes,
    ),
    "infonce": losses.infonce_loss(x["image"], x["text"], x["logit_scale"], valid, batch_axes=batch_axes)[0],
    "sigmoid": losses.sigmoid_loss(
      x["image"], x["text"], x["logit_scale"], x["logit_bias"], valid, batch_axes=batch_axes
    )[0],
  }


def _values_and_grads(x, masks, batch_axes=None):
  """Each loss and its gradient with respect to every float input, jitted."""
  out = {}
  for name in ("gloria", "infonce", "sigmoid"):
    fn = lambda x, name=name: _all_losses(x, masks, batch_axes)[name]
    out[name] = jax.jit(jax.value_and_grad(fn))(x)
  return out


@pytest.fixture(scope="module")
def dense_reference(problem):
  return _values_and_grads(*problem, batch_axes=())


@pytest.mark.multidevice
@pytest.mark.parametrize(
  "shape, force",
  [
    ((1, 1, 1), True),
    ((2, 1, 1), False),
    # The full tier: the same code path as the 2-device ring, over more devices and axes.
    pytest.param((8, 1, 1), False, marks=pytest.mark.slow),
    pytest.param((2, 2, 2), False, marks=pytest.mark.slow),
  ],
  ids=["1-device-ring", "2", "8", "2x2x2"],
)
def test_sharded_equals_dense_in_value_and_gradient(problem, dense_reference, shape, force):
  # force: a one-device mesh keeps the dense form by itself; forcing the ring
  # checks its bookkeeping with a ring of one.
  x, masks = problem
  with jax.set_mesh(_mesh(shape)):
    got = _values_and_grads(x, masks, batch_axes=("data", "fsdp") if force else None)
  for name, (value, grads) in got.items():
    ref_value, ref_grads = dense_reference[name]
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5, atol=1e-5, err_msg=name)
    for key in ref_grads:
      np.testing.assert_allclose(
        np.asarray(grads[key]), np.asarray(ref_grads[key]), rtol=1e-5, atol=1e-5, err_msg=f"{shape} {name} d/d{key}"
      )
    # The gradient reaches the loss parameters, and nothing of the padding rows.
    for key in LOSS_PARAMETERS[name]:
      assert np.all(np.asarray(grads[key]) != 0), (name, key)
    for key in ("words", "regions", "image", "text"):
      np.testing.assert_array_equal(np.asarray(grads[key])[list(INVALID)], 0.0, err_msg=f"{name} d/d{key}")


@pytest.mark.multidevice
def test_sharded_form_is_chosen_from_the_mesh(problem):
  x, masks = problem
  fn = jax.jit(lambda x: _all_losses(x, masks)["gloria"])
  assert "collective_permute" not in fn.lower(x).as_text()
  with jax.set_mesh(_mesh((4, 2, 1))):
    text = jax.jit(lambda x: _all_losses(x, masks)["gloria"]).lower(x).as_text()
    assert "collective_permute" in text
    assert losses.mesh_batch_axes(16) == ("data", "fsdp")
    assert losses.mesh_batch_axes(12) == ()  # does not divide over 8 devices
  with jax.set_mesh(_mesh((1, 1, 2))):
    assert losses.mesh_batch_axes(16) == ()  # batch axes of size 1
  assert losses.mesh_batch_axes(16) == ()  # no mesh


def _sigmoid_reference(img, txt, t, b):
  """-1/n sum_ij log sigmoid(z_ij (t x_i.y_j + b)), straight from the SigLIP paper."""
  logits = t * img @ txt.T + b
  z = 2 * np.eye(len(img)) - 1
  return -np.sum(np.log(1 / (1 + np.exp(-z * logits)))) / len(img)


@pytest.mark.multidevice
def test_sigmoid_loss_equals_numpy_reference_and_ignores_padding(problem):
  x, (_, _, valid) = problem
  keep = np.flatnonzero(valid)
  expected = _sigmoid_reference(
    x["image"][keep].astype(np.float64), x["text"][keep].astype(np.float64), math.exp(2.3), -3.0
  )
  for axes, shape in (((), (1, 1, 1)), (None, (8, 1, 1))):
    with jax.set_mesh(_mesh(shape)):
      got, scale = jax.jit(
        lambda x: losses.sigmoid_loss(x["image"], x["text"], x["logit_scale"], x["logit_bias"], valid, batch_axes=axes)
      )(x)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    np.testing.assert_allclose(float(scale), math.exp(2.3), rtol=1e-6)


def test_sigmoid_hand_example_and_clamp():
  # Two orthogonal pairs, t = 1, b = 0: logits = I, each row has one positive at 1 and one negative at 0.
  eye = jnp.eye(2)
  loss, _ = losses.sigmoid_loss(eye, eye, jnp.asarray(0.0), jnp.asarray(0.0))
  np.testing.assert_allclose(float(loss), -(np.log(1 / (1 + np.exp(-1.0))) + np.log(0.5)), rtol=1e-6)
  _, scale = losses.sigmoid_loss(eye, eye, jnp.asarray(10.0), jnp.asarray(0.0))
  np.testing.assert_allclose(float(scale), 100.0, rtol=1e-5)


def _compiled_temp_bytes(batch, batch_axes, mesh):
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
    shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
  )
  x = {
    "words": spec((batch, 32, 16)),
    "regions": spec((batch, 49, 16)),
    "temperatures": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=sharding.replicated(mesh)),
  }
  masks = (spec((batch, 32), bool), spec((batch, 49), bool), spec((batch,), bool))

  def fn(x, masks):
    return losses.gloria_local_loss(
      x["words"], masks[0], x["regions"], masks[1], x["temperatures"], masks[2], chunk_size=4, batch_axes=batch_axes
    )

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(fn)).lower(x, masks).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.slow  # full tier: compiles the local loss on two meshes
@pytest.mark.multidevice
def test_sharded_local_loss_needs_far_less_temporary_memory():
  mesh = _mesh((8, 1, 1))
  dense = _compiled_temp_bytes(128, (), mesh)
  sharded = _compiled_temp_bytes(128, None, mesh)
  # Dense: about B^2/8 word-region pairs per device; sharded: (B/8) x chunk.
  assert sharded * 8 < dense, (sharded, dense)


def _compiled_global_temp_bytes(name, batch, mesh, dim=16):
  spec = lambda shape, dtype=jnp.float32: jax.ShapeDtypeStruct(
    shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape))
  )
  scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
  x = {"image": spec((batch, dim)), "text": spec((batch, dim)), "logit_scale": scalar, "logit_bias": scalar}

  def fn(x, valid):
    if name == "infonce":
      return losses.infonce_loss(x["image"], x["text"], x["logit_scale"], valid)[0]
    return losses.sigmoid_loss(x["image"], x["text"], x["logit_scale"], x["logit_bias"], valid)[0]

  with jax.set_mesh(mesh):
    compiled = jax.jit(jax.value_and_grad(fn)).lower(x, spec((batch,), bool)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.multidevice
@pytest.mark.parametrize("name", ["infonce", "sigmoid"])
def test_sharded_global_loss_never_holds_its_rows_of_the_score_matrix(name):
  # The ring keeps one [B/N, B/N] block (with its masks, exponentials and cotangents, a few
  # copies of 4 x B^2 / N^2 bytes) and per-example running sums.  A device's [B/N, B] rows of
  # the logits, as a gather or a stack of the ring's blocks would keep them, are N times one
  # block: a stack of them needed about 3 x their size here.
  devices, batch = 8, 4096
  rows_of_the_matrix = 4 * batch * batch // devices
  temporaries = _compiled_global_temp_bytes(name, batch, _mesh((devices, 1, 1)))
  assert temporaries < rows_of_the_matrix, (name, temporaries, rows_of_the_matrix)


# ---------------------------------------------------------------------------
# The sigmoid option in the model and the training rules.


def _sigmoid_config(name="tiny"):
  return load_config(f"configs/{name}.py", {"loss.global_type": "sigmoid"})


@pytest.fixture(scope="module")
def sigmoid_params():
  return api.init_params(_sigmoid_config(), jax.random.key(0))["params"]


def test_logit_bias_exists_only_for_the_sigmoid_loss_and_trains(sigmoid_params):
  plain = api.abstract_params(load_config("configs/tiny.py"), boxed=False)["params"]
  assert "logit_bias" not in plain  # checkpoints of the other losses keep their parameter tree
  for name in ("base", "tiny", "demo"):
    config = _sigmoid_config(name)
    abstract = api.abstract_params(config, boxed=False)["params"]
    assert abstract["logit_bias"].shape == ()
    optim.check_rules(abstract, config.optim.param_groups, config.optim.learning_rates)
    assert optim.group_of("logit_bias", config.optim.param_groups) == "other_trainable"
  np.testing.assert_allclose(float(sigmoid_params["logit_bias"]), -10.0)
  np.testing.assert_allclose(float(sigmoid_params["logit_scale"]), math.log(10.0), rtol=1e-6)


def test_sigmoid_total_loss_gives_gradients_to_bias_and_scale(sigmoid_params):
  config = _sigmoid_config()
  model = api.build_model(config)
  params = sigmoid_params
  rng = np.random.RandomState(0)
  b, t = 4, config.model.text.max_len
  batch = dict(
    patches=rng.randint(0, 256, (b, 4, 49, 256)).astype(np.uint8),
    patch_idx=np.tile(np.arange(49, dtype=np.int32), (b, 4, 1)),
    view_valid=np.ones((b, 4), bool),
    input_ids=rng.randint(1000, 2000, (b, t)).astype(np.int32),
    attention_mask=(np.arange(t)[None] < np.array([[10], [7], [5], [12]])).astype(np.int32),
  )

  def loss_fn(scalars):
    return losses.clinvla_loss(model.apply({"params": {**params, **scalars}}, **batch), config.loss)

  # The gradient of the two scalars alone: the towers do not depend on them (no backward through them).
  scalars = {k: params[k] for k in ("logit_bias", "logit_scale")}
  (total, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(scalars)
  assert np.isfinite(float(total)) and float(metrics["logit_bias"]) == -10.0
  np.testing.assert_allclose(float(metrics["logit_scale"]), 10.0, rtol=1e-5)
  assert float(grads["logit_bias"]) != 0.0 and float(grads["logit_scale"]) != 0.0
  no_bias = dict(jax.jit(lambda p: model.apply({"params": p}, **batch))(params))
  del no_bias["logit_bias"]
  with pytest.raises(ValueError, match="logit_bias"):
    losses.clinvla_loss(no_bias, config.loss)
  bad = ml_collections.ConfigDict(config.loss.to_dict())
  bad.global_type = "siglip"
  with pytest.raises(ValueError, match="global_type"):
    losses.clinvla_loss(no_bias, bad)
