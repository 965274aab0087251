"""scan_layers: one nn.scan over stacked blocks computes what the loop of blocks computes, and trees move between them."""

import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from clinvla_jax import api, convert, optim, sharding, summary
from clinvla_jax.config import load_config
from clinvla_jax.model import layers
from clinvla_jax.model.clinvla import matmul_ready_params

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "clinvla_jax" / "assets" / "demo" / "covid_cxr"
SCAN = {"model.image.scan_layers": True, "model.text.scan_layers": True}


def _cfg(scan: bool, **overrides):
  return load_config("configs/tiny.py", dict(SCAN if scan else {}, **overrides))


@pytest.fixture(scope="module")
def loop_variables():
  return api.init_params(_cfg(False), jax.random.key(0))


def _batch(cfg, seed=0, batch=2, kept=49):
  rng = np.random.RandomState(seed)
  idx = np.stack([np.stack([np.sort(rng.choice(196, kept, replace=False)) for _ in range(4)]) for _ in range(batch)])
  return dict(
    patches=rng.randint(0, 256, size=(batch, 4, kept, 256)).astype(np.uint8),
    patch_idx=idx.astype(np.int32),
    view_valid=np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)[:batch],
    input_ids=rng.randint(1000, 2000, size=(batch, cfg.model.text.max_len)).astype(np.int32),
    attention_mask=(np.arange(cfg.model.text.max_len)[None] < np.array([[20], [9]])[:batch]).astype(np.int32),
  )


def _outputs_loss_and_grads(cfg, variables, batch):
  model = api.build_model(cfg)

  def loss(v):
    out = model.apply(v, **batch)
    value = (
      jnp.sum(out["image"]["global"] * out["text"]["global"])
      + jnp.mean(out["image"]["local"] ** 2)
      + jnp.mean(out["text"]["local"] ** 2)
    )
    return value, out

  (value, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables)
  return out, value, grads


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# Adapters with non-zero up-projections, so that their outputs and gradients are exercised.
BERT_ADAPTERS = {"model.image.adapter_init": "bert", "model.text.adapter_init": "bert"}


@pytest.fixture(scope="module")
def loop_reference():
  """The loop layout's outputs, loss and gradients (no remat, no barrier: test_model checks those keep them)."""
  cfg = _cfg(False, **BERT_ADAPTERS, **{"model.residual_grad_barrier": "off"})
  variables = api.init_params(cfg, jax.random.key(1))
  batch = _batch(cfg)
  return variables, batch, _outputs_loss_and_grads(cfg, variables, batch)


def test_scan_layout_stacks_every_block_parameter_with_a_layers_axis(loop_variables):
  boxed = api.abstract_params(_cfg(True))["params"]
  image, text = boxed["image_tower"], boxed["text_tower"]
  assert not any(k.startswith("blocks_") for k in image) and not any(k.startswith("layer_") for k in text)
  assert image["blocks"]["attn"]["qkv"]["kernel"].names == ("layers", "embed", None, "heads", "kv")
  assert text["layer"]["intermediate"]["kernel"].names == ("layers", "embed", "mlp")
  assert text["layer"]["intermediate"]["kernel"].value.shape == (2, 64, 128)
  # The same tree as the loop layout's, stacked.
  stacked = convert.stack_layers(loop_variables)
  abstract = api.abstract_params(_cfg(True), boxed=False)
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(abstract)
  assert jax.tree_util.tree_map(lambda x: x.shape, stacked) == jax.tree_util.tree_map(lambda x: x.shape, abstract)
  assert convert.layer_layouts(stacked) == {"image_tower": "scan", "text_tower": "scan"}
  assert convert.layer_layouts(loop_variables) == {"image_tower": "loop", "text_tower": "loop"}


# Remat inside the scanned body, with and without the residual gradient barrier.
@pytest.mark.parametrize(
  "policy,barrier",
  [
    ("none", "off"),
    pytest.param("full", "on", marks=pytest.mark.slow),
    pytest.param("dots_no_batch", "off", marks=pytest.mark.slow),
  ],
  ids=["plain", "full+barrier", "dots"],
)
def test_scan_equals_loop_forward_and_gradients(loop_reference, policy, barrier):
  variables, batch, (ref_out, ref_loss, ref_grads) = loop_reference
  overrides = dict(BERT_ADAPTERS, **{"model.image.remat_policy": policy, "model.text.remat_policy": policy})
  cfg = _cfg(True, **overrides, **{"model.residual_grad_barrier": barrier})
  mcfg = api.model_config(cfg)
  assert mcfg.text.residual_grad_barrier is (barrier == "on") and layers.remat_policy_name(mcfg.image) == policy
  out, loss, grads = _outputs_loss_and_grads(cfg, convert.stack_layers(variables), batch)
  _assert_trees_close(out, ref_out, atol=2e-6)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  _assert_trees_close(convert.unstack_layers(grads), ref_grads, rtol=1e-4)


def test_one_tower_scanned_the_other_looped(loop_variables):
  cfg = _cfg(False, **{"model.text.scan_layers": True})
  variables = convert.to_model_layout(loop_variables, api.model_config(cfg))
  assert convert.layer_layouts(variables) == {"image_tower": "loop", "text_tower": "scan"}
  batch = _batch(cfg)
  ref = api.encode_text(_cfg(False), loop_variables, batch["input_ids"], batch["attention_mask"])
  out = api.encode_text(cfg, variables, batch["input_ids"], batch["attention_mask"])
  _assert_trees_close(out, ref, atol=2e-6)


@pytest.mark.slow  # full tier: a scanned dropout forward of its own to compile
def test_dropout_draws_new_masks_in_every_scanned_layer(monkeypatch):
  cfg = _cfg(True, **{"model.text.dropout": 0.1, "model.text.attention_dropout": 0.1})
  variables = api.init_params(cfg, jax.random.key(0))
  batch = _batch(cfg)
  keys = []
  original = layers.dropout_keep_mask

  def recording(rng, rate, shape):
    jax.debug.callback(lambda k: keys.append(np.asarray(k).tobytes()), jax.random.key_data(rng))
    return original(rng, rate, shape)

  monkeypatch.setattr(layers, "dropout_keep_mask", recording)
  model = api.build_model(cfg)

  @jax.jit
  def run(key):
    return model.apply(
      variables,
      batch["input_ids"],
      batch["attention_mask"],
      deterministic=False,
      rngs={"dropout": key},
      method=type(model).encode_text,
    )["hidden"]

  a = jax.block_until_ready(run(jax.random.key(0)))
  jax.effects_barrier()
  # Embeddings once, then per layer: attention probabilities and two hidden dropouts.
  assert len(keys) == 1 + 3 * cfg.model.text.num_layers
  assert len(set(keys)) == len(keys)
  np.testing.assert_array_equal(np.asarray(run(jax.random.key(0))), np.asarray(a))
  assert np.abs(np.asarray(run(jax.random.key(1))) - np.asarray(a)).max() > 1e-3


def test_stack_unstack_round_trip_on_full_trainable_boxed_and_abstract_trees(loop_variables):
  stacked = convert.stack_layers(loop_variables)
  back = convert.unstack_layers(stacked)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(loop_variables)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(loop_variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Idempotent; a tower holding no blocks passes through.
  assert jax.tree_util.tree_structure(convert.stack_layers(stacked)) == jax.tree_util.tree_structure(stacked)
  assert convert.unstack_layers({"params": {"image_tower": {"norm": 1}}}) == {"params": {"image_tower": {"norm": 1}}}
  # Block 1 is index 1 of the stacked leaf.
  np.testing.assert_array_equal(
    stacked["params"]["text_tower"]["layer"]["task_adapter"]["down"]["kernel"][1],
    loop_variables["params"]["text_tower"]["layer_1"]["task_adapter"]["down"]["kernel"],
  )
  # A trainable subset, with numpy leaves.
  rules = load_config("configs/tiny.py").optim.param_groups
  trainable, _ = optim.split_params(jax.tree_util.tree_map(np.asarray, loop_variables["params"]), rules)
  stacked_trainable = convert.stack_layers(trainable)
  assert isinstance(stacked_trainable["image_tower"]["blocks"]["adapter"]["up"]["kernel"], np.ndarray)
  assert "attn" not in stacked_trainable["image_tower"]["blocks"]
  scan_trainable, _ = optim.split_params(api.abstract_params(_cfg(True), boxed=False)["params"], rules)
  assert jax.tree_util.tree_structure(stacked_trainable) == jax.tree_util.tree_structure(scan_trainable)
  # Boxed (logical names) and abstract trees.
  boxed_loop = api.abstract_params(_cfg(False))["params"]
  boxed_scan = api.abstract_params(_cfg(True))["params"]
  is_box = lambda x: isinstance(x, nn.Partitioned)  # noqa: E731
  for a, b in zip(
    jax.tree_util.tree_leaves(convert.stack_layers(boxed_loop), is_leaf=is_box),
    jax.tree_util.tree_leaves(boxed_scan, is_leaf=is_box),
  ):
    assert a.names == b.names and a.value.shape == b.value.shape
  unboxed = convert.unstack_layers(boxed_scan)
  assert unboxed["text_tower"]["layer_1"]["intermediate"]["kernel"].names == ("embed", "mlp")


def test_partial_or_mixed_trees_are_clear_errors(loop_variables):
  params = dict(loop_variables["params"])
  image = dict(params["image_tower"])
  del image["blocks_0"]
  with pytest.raises(ValueError, match="not 0..0"):
    convert.stack_layers({"image_tower": image})
  image["blocks"] = image["blocks_1"]
  with pytest.raises(ValueError, match="both"):
    convert.stack_layers({"image_tower": image})
  with pytest.raises(ValueError, match="disagree on the number of blocks"):
    convert.unstack_layers({"image_tower": {"blocks": image["blocks_1"]}})
  with pytest.raises(ValueError, match="pass num_blocks"):
    convert.unstack_layers({"image_tower": {"blocks": {"norm1": ()}}})
  assert set(
    convert.unstack_layers({"image_tower": {"blocks": {"norm1": ()}}}, num_blocks={"image_tower": 2})["image_tower"]
  ) == {"blocks_0", "blocks_1"}
  with pytest.raises(ValueError, match="unknown towers"):
    convert.stack_layers(params, towers=["vision"])


def test_param_groups_summary_and_matmul_casts_see_the_same_parameters(loop_variables):
  # The tiny config has the base config's param_groups and summary parts.
  loop_cfg, scan_cfg = _cfg(False), _cfg(True)
  assert list(loop_cfg.optim.param_groups) == list(load_config("configs/base.py").optim.param_groups)
  rules = loop_cfg.optim.param_groups
  loop_abstract = api.abstract_params(loop_cfg, boxed=False)["params"]
  scan_abstract = api.abstract_params(scan_cfg, boxed=False)["params"]
  lrs = loop_cfg.optim.learning_rates
  assert optim.check_rules(loop_abstract, rules, lrs) == optim.check_rules(scan_abstract, rules, lrs)
  # Every block parameter has the group of its stacked parameter, in every block.
  scan_groups = {p: optim.group_of(p, rules) for p in optim.flat_paths(scan_abstract)}
  for path in optim.flat_paths(loop_abstract):
    stacked = re.sub(r"/(blocks|layer)_\d+/", r"/\1/", path)
    assert scan_groups[stacked] == optim.group_of(path, rules), path
  assert summary.parameter_table(loop_cfg) == summary.parameter_table(scan_cfg)
  # matmul_ready_params casts the stacked kernels as it casts the per-block ones.
  bf16 = {"model.precision": "bfloat16"}
  mcfg_loop, mcfg_scan = api.model_config(_cfg(False, **bf16)), api.model_config(_cfg(True, **bf16))
  loop_params = loop_variables["params"]
  cast_loop = matmul_ready_params(loop_params, mcfg_loop)
  cast_scan = matmul_ready_params(convert.stack_layers(loop_params), mcfg_scan)
  assert cast_scan["image_tower"]["blocks"]["mlp"]["fc1"]["kernel"].dtype == jnp.bfloat16
  assert cast_scan["text_tower"]["layer"]["output_norm"]["scale"].dtype == jnp.float32
  for a, b in zip(jax.tree_util.tree_leaves(convert.stack_layers(cast_loop)), jax.tree_util.tree_leaves(cast_scan)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_scan_init_puts_the_layers_axis_unsharded():
  config = load_config("configs/tiny.py", SCAN)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
  mesh = sharding.make_mesh(config.mesh)
  boxed = api.abstract_params(config)["params"]
  shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules(config))
  assert shardings["image_tower"]["blocks"]["mlp"]["fc1"]["kernel"].spec == P(None, "fsdp", "tensor")
  assert shardings["text_tower"]["layer"]["attention"]["query"]["kernel"].spec == P(None, "fsdp", "tensor", None)
  init = api.init_fn(api.model_config(config), boxed=False)
  params = jax.jit(lambda key: init(key)["params"], out_shardings=shardings)(jax.random.key(0))
  fc1 = params["image_tower"]["blocks"]["mlp"]["fc1"]["kernel"]
  assert fc1.shape == (2, 64, 128) and fc1.sharding.spec == P(None, "fsdp", "tensor")
  assert fc1.addressable_shards[0].data.shape == (2, 32, 64)


def _tiny_train(scan: bool, **overrides):
  base = {
    "data.train": str(DEMO),
    "optim.warmup_steps": 1,
    "train.num_steps": 3,
    "train.data_workers": 0,
    "optim.batch_size": 8,
  }
  base.update(overrides)
  return _cfg(scan, **base)


def _perturbed(tree, seed):
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_unflatten(
    treedef, [np.asarray(x) + rng.normal(scale=0.01, size=np.shape(x)).astype(np.asarray(x).dtype) for x in leaves]
  )


def _saved_trained_looking_state(tmp_path, scan: bool):
  from clinvla_jax import train
  from clinvla_jax.checkpoint import Checkpointer

  saver = train.TrainSetup(_tiny_train(scan))
  state = saver.init_state()
  # Every parameter and moment differs from its initial value.
  state = jax.device_put(
    {
      "step": state["step"] + 7,
      "params": _perturbed(state["params"], 1),
      "opt_state": _perturbed(state["opt_state"], 2),
    },
    saver.state_shardings,
  )
  ckpt = Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(7, state, None, {"note": "layout test"})
  ckpt.wait()
  return ckpt, jax.device_get(state)


@pytest.mark.slow
def test_adapter_checkpoint_from_the_loop_layout_restores_into_the_scan_layout(tmp_path):
  from clinvla_jax import train
  from clinvla_jax.checkpoint import IncompatibleCheckpointError

  ckpt, saved = _saved_trained_looking_state(tmp_path, scan=False)
  wanted = train.TrainSetup(_tiny_train(True))
  restored, _ = ckpt.restore(7, wanted.abstract_state)
  expected = convert.to_model_layout(saved, wanted.model_config)
  assert int(restored["step"]) == 7
  assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(wanted.abstract_state)
  leaves = zip(
    jax.tree_util.tree_leaves(restored),
    jax.tree_util.tree_leaves(expected),
    jax.tree_util.tree_leaves(wanted.abstract_state),
  )
  for got, want, target in leaves:
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert got.sharding == target.sharding

  # The layout does not make a checkpoint fit: a different adapter still does not.
  def narrower(path, x):
    if "language_adapter/down/kernel" in "/".join(str(getattr(k, "key", k)) for k in path):
      return jax.ShapeDtypeStruct((*x.shape[:-1], 8), x.dtype, sharding=x.sharding)
    return x

  other = jax.tree_util.tree_map_with_path(narrower, wanted.abstract_state)
  with pytest.raises(IncompatibleCheckpointError, match="language_adapter/down/kernel"):
    ckpt.restore(7, other)
  ckpt.close()


def test_adapter_checkpoint_from_the_scan_layout_restores_for_evaluation_in_the_loop_layout(tmp_path):
  from clinvla_jax import weights

  ckpt, saved = _saved_trained_looking_state(tmp_path, scan=True)
  ckpt.close()
  config = _tiny_train(False)
  variables, step = weights.restore_variables(config, str(tmp_path))
  assert step == 7 and convert.layer_layouts(variables) == {"image_tower": "loop", "text_tower": "loop"}
  trained = convert.unstack_layers(saved["params"])
  flat = optim.flat_paths(jax.device_get(variables["params"]))
  for path, value in optim.flat_paths(trained).items():
    np.testing.assert_array_equal(np.asarray(flat[path]), np.asarray(value))
  assert set(flat) == set(optim.flat_paths(api.abstract_params(config, boxed=False)["params"]))


@pytest.mark.slow
@pytest.mark.multidevice
def test_train_steps_equal_in_both_layouts_on_a_sharded_mesh():
  from clinvla_jax import train
  from clinvla_jax.data import pipeline
  from clinvla_jax.data.source import list_shards

  setups = {}
  for scan in (False, True):
    config = _tiny_train(scan)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 2, 2, 2
    setups[scan] = train.TrainSetup(config)
  loop, scanned = setups[False], setups[True]
  # The same start: the scan layout initialises its blocks from other random keys.
  scanned.frozen = jax.device_put(convert.stack_layers(jax.device_get(loop.frozen)), scanned.frozen_shardings)
  loop_state = loop.init_state()
  scan_state = jax.device_put(convert.stack_layers(jax.device_get(loop_state)), scanned.state_shardings)
  loader = pipeline.make_train_loader(
    list_shards(str(DEMO), split="train"), global_batch_size=8, seed=0, shard_index=0, shard_count=1
  )
  for batch, _ in zip(loader, range(2)):
    loop_state, loop_metrics = loop.step(loop_state, sharding.global_batch(batch, loop.mesh, train.MODEL_INPUTS))
    scan_state, scan_metrics = scanned.step(scan_state, sharding.global_batch(batch, scanned.mesh, train.MODEL_INPUTS))
    np.testing.assert_allclose(float(scan_metrics["loss"]), float(loop_metrics["loss"]), rtol=1e-5)
  _assert_trees_close(
    convert.unstack_layers(jax.device_get(scan_state["params"])), jax.device_get(loop_state["params"]), rtol=1e-4
  )
