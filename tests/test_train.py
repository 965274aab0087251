"""Training: mesh equivalence, adapter-only checkpoints, exact resume, multi-process, NaN guard."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from clinvla_jax import optim, sharding
from clinvla_jax.config import load_config
from clinvla_jax.data import pipeline
from clinvla_jax.data.source import list_shards

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = REPO / "clinvla_jax" / "assets" / "demo" / "covid_cxr"


def _tiny(**overrides):
  base = {"data.train": str(DEMO), "optim.warmup_steps": 1, "train.num_steps": 3, "train.log_every_steps": 1,
          "train.data_workers": 0, "optim.batch_size": 8}
  base.update(overrides)
  return load_config(str(REPO / "configs" / "tiny.py"), base)


def _batches(config, n):
  loader = pipeline.make_train_loader(list_shards(config.data.train, split="train"),
                                      global_batch_size=config.optim.batch_size, seed=0, shard_index=0,
                                      shard_count=1)
  it = iter(loader)
  return [next(it) for _ in range(n)]


def _run_steps(config, mesh_shape, batches):
  from clinvla_jax import train
  devices = jax.devices()[:int(np.prod(mesh_shape))]
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  setup = train.TrainSetup(config, mesh=sharding.make_mesh(config.mesh, devices))
  state = setup.init_state()
  losses = []
  for b in batches:
    state, metrics = setup.step(state, sharding.global_batch(b, setup.mesh, train.MODEL_INPUTS))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state["params"]), setup


@pytest.mark.slow
def test_meshes_give_equal_losses_and_parameters():
  assert jax.device_count() >= 8, "tests/conftest.py sets 8 simulated CPU devices"
  config = _tiny()
  batches = _batches(config, 3)
  ref_losses, ref_params, _ = _run_steps(_tiny(), (1, 1, 1), batches)
  assert np.all(np.isfinite(ref_losses)) and ref_losses[0] != ref_losses[2]
  for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
    losses, params, setup = _run_steps(_tiny(), shape, batches)
    np.testing.assert_allclose(losses, ref_losses, atol=1e-5, rtol=0, err_msg=str(shape))
    flat_ref = traverse_util.flatten_dict(ref_params)
    for path, value in traverse_util.flatten_dict(params).items():
      np.testing.assert_allclose(value, flat_ref[path], atol=1e-5, rtol=0, err_msg=f"{shape} {path}")
    if shape == (2, 2, 2):
      # FSDP and tensor parallelism really shard: a kernel split over both axes.
      kernel = setup.frozen["text_tower"]["layer_0"]["intermediate"]["kernel"]
      assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
      assert len({str(s.index) for s in kernel.addressable_shards}) == 4


def test_path_rules_cover_every_parameter_and_fail_on_gaps():
  from clinvla_jax import api
  for name in ("base", "tiny", "demo"):
    config = load_config(str(REPO / "configs" / f"{name}.py"))
    abstract = api.abstract_params(config, boxed=False)["params"]
    counts = optim.check_rules(abstract, config.optim.param_groups, config.optim.learning_rates)
    groups = {"frozen", "language_adapters", "task_adapters", "other_trainable"}
    # The demo trains its randomly initialised image backbone in full.
    assert set(counts) == (groups | {"image_tower"} if name == "demo" else groups)
    if name == "demo":
      image_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["image_tower"]))
      assert counts["image_tower"] == image_params
      assert optim.group_of("text_tower/layer_0/intermediate/kernel", config.optim.param_groups) == "frozen"
  with pytest.raises(ValueError, match="matches no rule"):
    optim.check_rules(abstract, ((r".*adapter.*", "other_trainable"),), config.optim.learning_rates)


def test_frozen_backbone_has_no_gradient_and_no_optimizer_state():
  from clinvla_jax import train
  config = _tiny()
  setup = train.TrainSetup(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:1]))
  frozen_paths = set(optim.flat_paths(setup.frozen))
  trainable_paths = set(optim.flat_paths(setup.trainable_init))
  assert "text_tower/layer_0/intermediate/kernel" in frozen_paths
  assert "text_tower/layer_0/language_adapter/down/kernel" in trainable_paths
  assert not frozen_paths & trainable_paths
  state = setup.init_state()
  opt_leaves = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["opt_state"]))
  trainable = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(state["params"]))
  # AdamW keeps two moments per trainable value (+ counters): nothing for the frozen backbone.
  assert 2 * trainable <= opt_leaves <= 2 * trainable + 16
  # The frozen weights are an input of the loss, not a differentiated one: the
  # compiled gradient has far fewer matmuls than a full-model gradient would.
  from clinvla_jax import losses
  batch = sharding.global_batch(_batches(config, 1)[0], setup.mesh, train.MODEL_INPUTS)
  inputs = [batch[k] for k in train.MODEL_INPUTS]

  def loss(trainable, frozen):
    out = setup.model.apply({"params": optim.merge_params(trainable, frozen)}, *inputs)
    return losses.clinvla_loss(out, config.loss)[0]

  def count_dots(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text().count(" dot(")

  adapters_only = count_dots(jax.grad(loss, argnums=0), setup.trainable_init, setup.frozen)
  everything = count_dots(jax.grad(loss, argnums=(0, 1)), setup.trainable_init, setup.frozen)
  assert 0 < adapters_only < everything, (adapters_only, everything)
  out_state, _ = setup.step(state, batch)
  assert int(out_state["step"]) == 1


def _main(workdir, *extra, env=None, wait=True):
  cmd = [sys.executable, "-m", "clinvla_jax.main", f"--config={REPO / 'configs' / 'tiny.py'}",
         f"--config.data.train={DEMO}", f"--workdir={workdir}", "--config.train.log_every_steps=1",
         "--config.optim.warmup_steps=2", "--config.train.data_workers=0", *extra]
  run_env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", **(env or {}))
  if wait:
    return subprocess.run(cmd, cwd=REPO, env=run_env, capture_output=True, text=True, timeout=600)
  return subprocess.Popen(cmd, cwd=REPO, env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _losses_by_step(workdir):
  by_step = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    by_step[record["step"]] = record["loss"]
  return by_step


@pytest.mark.slow
def test_kill_and_resume_gives_identical_losses(tmp_path):
  steps = ["--config.train.num_steps=12", "--config.train.checkpoint_every_steps=2"]
  ref = _main(tmp_path / "ref", *steps)
  assert ref.returncode == 0, ref.stderr[-3000:]
  ref_losses = _losses_by_step(tmp_path / "ref")
  assert sorted(ref_losses) == list(range(1, 13))

  work = tmp_path / "killed"
  proc = _main(work, *steps, wait=False)
  deadline = time.time() + 300
  while not (work / "checkpoints" / "4").is_dir():
    assert proc.poll() is None and time.time() < deadline, "training ended before its step-4 checkpoint"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (work / "checkpoints" / "12").exists(), "the run finished before it was killed"

  resumed = _main(work, *steps)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stdout
  losses = _losses_by_step(work)
  assert sorted(losses) == list(range(1, 13))
  for step in range(1, 13):
    assert losses[step] == ref_losses[step], (step, losses[step], ref_losses[step])


@pytest.mark.slow
def test_incompatible_checkpoint_is_a_clear_error(tmp_path):
  first = _main(tmp_path, "--config.train.num_steps=1", "--config.train.checkpoint_every_steps=1")
  assert first.returncode == 0, first.stderr[-3000:]
  second = _main(tmp_path, "--config.train.num_steps=2", "--config.model.image.adapter_dim=8")
  assert second.returncode != 0
  assert "does not fit this config" in second.stderr and "adapter" in second.stderr


def test_nan_loss_stops_with_step_and_saves_nothing(tmp_path):
  from clinvla_jax import train
  config = _tiny(**{"train.checkpoint_every_steps": 1})
  config.model.logit_scale_init = float("nan")
  with pytest.raises(train.NonFiniteLossError, match="at step 1"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not any((tmp_path / "checkpoints").glob("[0-9]*"))


def test_adapter_only_checkpoint_holds_no_backbone(tmp_path):
  from clinvla_jax import train
  config = _tiny(**{"train.num_steps": 1, "train.checkpoint_every_steps": 1})
  train.train_and_evaluate(config, str(tmp_path))
  state_dir = tmp_path / "checkpoints" / "1" / "state"
  assert state_dir.is_dir()
  from clinvla_jax.checkpoint import Checkpointer
  ckpt = Checkpointer(str(tmp_path))
  meta = ckpt.manager.item_metadata(1)["state"]
  paths = {"/".join(str(getattr(k, "key", k)) for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(meta)}
  ckpt.close()
  param_paths = {p for p in paths if p.startswith("params/")}
  assert any("language_adapter" in p for p in param_paths)
  assert not any("intermediate" in p or "word_embeddings" in p or "attn/qkv" in p for p in paths)


def test_base_adapter_checkpoint_is_a_small_fraction():
  from clinvla_jax import api
  config = load_config(str(REPO / "configs" / "base.py"))
  abstract = api.abstract_params(config, boxed=False)["params"]
  trainable, _ = optim.split_params(abstract, config.optim.param_groups)
  full = sum(int(np.prod(x.shape)) * 4 for x in jax.tree_util.tree_leaves(abstract))
  ckpt = 3 * sum(int(np.prod(x.shape)) * 4 for x in jax.tree_util.tree_leaves(trainable))  # params + 2 moments
  assert ckpt / full < 0.15, ckpt / full


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
  steps = ["--config.train.num_steps=3", "--config.train.checkpoint_every_steps=100"]
  single = _main(tmp_path / "one", *steps)
  assert single.returncode == 0, single.stderr[-3000:]
  port = _free_port()
  procs = [
      _main(tmp_path / "two", *steps, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
            f"--process_id={i}", wait=False) for i in range(2)]
  for p in procs:
    assert p.wait(timeout=600) == 0
  one, two = _losses_by_step(tmp_path / "one"), _losses_by_step(tmp_path / "two")
  assert sorted(two) == [1, 2, 3]
  for step in (1, 2, 3):
    assert abs(one[step] - two[step]) <= 1e-5, (step, one[step], two[step])


def test_training_shortens_tokens_like_evaluation():
  from clinvla_jax import train
  from clinvla_jax.evaluate.embed import fit_token_length
  ids = np.array([[101, 5, 6, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0, 0, 0]], np.int32)
  mask = (ids > 0).astype(np.int32)
  out = train.fit_text_length({"input_ids": ids, "attention_mask": mask, "labels": np.zeros((2, 1))}, 4)
  want_ids, want_mask = fit_token_length(ids, mask, 4)
  np.testing.assert_array_equal(out["input_ids"], want_ids)
  np.testing.assert_array_equal(out["attention_mask"], want_mask)
  assert out["input_ids"][0, -1] == 102 and out["input_ids"].shape == (2, 4)
  assert train.fit_text_length({"input_ids": ids, "attention_mask": mask}, 8)["input_ids"] is ids
