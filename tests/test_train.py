"""Training: mesh equivalence, adapter-only checkpoints, exact resume, multi-process, NaN guard."""

import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import traverse_util

from clinvla_jax import optim, sharding
from clinvla_jax.config import load_config
from clinvla_jax.data import pipeline
from clinvla_jax.data.source import list_shards

import tiny_runs

REPO = pathlib.Path(__file__).resolve().parents[1]


def _batches(config, n):
  loader = pipeline.make_train_loader(
    list_shards(config.data.train, split="train"),
    global_batch_size=config.optim.batch_size,
    seed=0,
    shard_index=0,
    shard_count=1,
  )
  it = iter(loader)
  return [next(it) for _ in range(n)]


def _run_steps(config, mesh_shape, batches):
  from clinvla_jax import train

  devices = jax.devices()[: int(np.prod(mesh_shape))]
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
  setup = train.TrainSetup(config, mesh=sharding.make_mesh(config.mesh, devices))
  state = setup.init_state()
  losses = []
  for b in batches:
    state, metrics = setup.step(state, sharding.global_batch(b, setup.mesh, train.MODEL_INPUTS))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state["params"]), setup


@pytest.mark.slow
@pytest.mark.multidevice
def test_meshes_give_equal_losses_and_parameters():
  assert jax.device_count() >= 8, "multidevice tests have 8 simulated CPU devices (tests/conftest.py)"
  config = tiny_runs.config()
  batches = _batches(config, 3)
  ref_losses, ref_params, _ = _run_steps(tiny_runs.config(), (1, 1, 1), batches)
  assert np.all(np.isfinite(ref_losses)) and ref_losses[0] != ref_losses[2]
  for shape in ((8, 1, 1), (2, 4, 1), (2, 2, 2)):
    losses, params, setup = _run_steps(tiny_runs.config(), shape, batches)
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
    # The demo trains its randomly initialised image backbone in full and freezes the whole text tower, adapters
    # included, so its only trained text parameters are the projection heads ("other_trainable").
    assert set(counts) == ({"frozen", "image_tower", "other_trainable"} if name == "demo" else groups)
    if name == "demo":
      image_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["image_tower"]))
      assert counts["image_tower"] == image_params
      text_params = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["text_tower"]))
      assert counts["frozen"] == text_params
      for path in ("text_tower/layer_0/intermediate/kernel", "text_tower/layer_0/task_adapter/up/kernel"):
        assert optim.group_of(path, config.optim.param_groups) == "frozen"
      assert optim.group_of("text_global_head/dense1/kernel", config.optim.param_groups) == "other_trainable"
  with pytest.raises(ValueError, match="matches no rule"):
    optim.check_rules(abstract, ((r".*adapter.*", "other_trainable"),), config.optim.learning_rates)


def test_frozen_backbone_has_no_gradient_and_no_optimizer_state():
  from clinvla_jax import train

  config = tiny_runs.config()
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
    # The lowered program (before XLA): autodiff emits no cotangent matmuls for an input it does not
    # differentiate, so the count tells without compiling either gradient.
    return jax.jit(fn).lower(*args).as_text().count("stablehlo.dot_general")

  adapters_only = count_dots(jax.grad(loss, argnums=0), setup.trainable_init, setup.frozen)
  everything = count_dots(jax.grad(loss, argnums=(0, 1)), setup.trainable_init, setup.frozen)
  assert 0 < adapters_only < everything, (adapters_only, everything)
  out_state, _ = setup.step(state, batch)
  assert int(out_state["step"]) == 1


def _main(workdir, *extra, wait=True, capture=False, **settings):
  """The command line on the tiny config: the shared run's settings (tests/tiny_runs.py) with ``settings``."""
  cmd = tiny_runs.command(workdir, *extra, run={**tiny_runs.RUN, **settings})
  if wait:
    return subprocess.run(cmd, cwd=REPO, env=tiny_runs.env(), capture_output=True, text=True, timeout=600)
  if capture:
    # Files, not pipes: a long run's progress bar would fill an unread pipe and stall it.
    log = pathlib.Path(str(workdir) + f".{len(extra)}.{time.time_ns()}")
    proc = subprocess.Popen(
      cmd, cwd=REPO, env=tiny_runs.env(), stdout=open(f"{log}.out", "w"), stderr=open(f"{log}.err", "w"), text=True
    )
    proc.stdout_path, proc.stderr_path = pathlib.Path(f"{log}.out"), pathlib.Path(f"{log}.err")
    return proc
  return subprocess.Popen(cmd, cwd=REPO, env=tiny_runs.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_step(workdir, step, procs, timeout=300):
  """Until metrics.jsonl logs ``step`` (or a process ends first)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.time() + timeout
  while True:
    if path.exists() and any(json.loads(l).get("step", 0) >= step for l in path.read_text().splitlines() if l):
      return
    assert all(p.poll() is None for p in procs), "training ended before it could be signalled"
    assert time.time() < deadline, f"step {step} not logged within {timeout} s"
    time.sleep(0.05)


NUM_STEPS = tiny_runs.NUM_STEPS


def _resume_in_process(workdir, capsys, **settings):
  """Reruns the interrupted command's training in this process (a restart, not a process boundary, is tested)."""
  from clinvla_jax import train

  capsys.readouterr()
  train.train_and_evaluate(tiny_runs.config(**settings), str(workdir))
  return capsys.readouterr().out


def _assert_losses_equal_the_reference(workdir, reference):
  losses = tiny_runs.losses_by_step(workdir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  for step in range(1, NUM_STEPS + 1):
    assert losses[step] == reference[step], (step, losses[step], reference[step])


@pytest.mark.slow
def test_kill_and_resume_gives_identical_losses(tmp_path, tiny_run, capsys):
  # The same command as the shared uninterrupted run (tiny_run), killed after its step-4 checkpoint.
  work = tmp_path / "killed"
  proc = _main(work, wait=False)
  deadline = time.time() + 300
  while not (work / "checkpoints" / "4").is_dir():
    assert proc.poll() is None and time.time() < deadline, "training ended before its step-4 checkpoint"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (work / "checkpoints" / str(NUM_STEPS)).exists(), "the run finished before it was killed"

  out = _resume_in_process(work, capsys)
  assert "resumed from" in out
  _assert_losses_equal_the_reference(work, tiny_run.losses)


@pytest.mark.slow
def test_sigterm_saves_at_the_step_boundary_and_resume_matches(tmp_path, tiny_run, capsys):
  # No periodic checkpoint before the end: whatever survives is the preemption save.
  no_periodic = {"train.checkpoint_every_steps": 1000}
  work = tmp_path / "terminated"
  proc = _main(work, wait=False, capture=True, **no_periodic)
  _wait_for_step(work, 3, [proc])
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 128 + signal.SIGTERM
  saved = tiny_runs.saved_steps(work)
  assert len(saved) == 1 and 3 <= saved[0] < NUM_STEPS, saved
  out, err = proc.stdout_path.read_text(), proc.stderr_path.read_text()
  assert f"stopped by SIGTERM at step {saved[0]}: checkpoint saved to" in out, out[-2000:]
  # Quiet console: no absl/Orbax INFO lines, yet the log file has them.
  assert not re.search(r"^I\d{4} ", err, re.M), err[-2000:]
  log = (work / "train.log").read_text()
  assert re.search(r"^I\d{4} .*checkpoint", log, re.M | re.I)

  out = _resume_in_process(work, capsys, **no_periodic)
  assert f"resumed from {work / 'checkpoints'}/{saved[0]}" in out
  assert "training views: affine (rotation +-20 deg, x shear +-10 deg, shift +-0.1, scale 0.95-1.05)" in out
  _assert_losses_equal_the_reference(work, tiny_run.losses)


@pytest.mark.slow
def test_second_trainer_on_a_workdir_exits_at_once_naming_the_holder(tmp_path):
  work = tmp_path / "shared"
  endless = {"train.num_steps": 100000, "train.checkpoint_every_steps": 100000}
  first = _main(work, wait=False, capture=True, **endless)
  try:
    _wait_for_step(work, 2, [first])
    second = _main(work, **endless)
    assert second.returncode == 1, second.stderr[-3000:]
    assert "is in use by another trainer" in second.stderr
    assert f"host {socket.gethostname()}, pid {first.pid}, started " in second.stderr, second.stderr[-2000:]
    # It stops before building a model: no compilation, no step.
    assert "train step compiled" not in second.stdout and "parameters:" not in second.stdout
    assert first.poll() is None
  finally:
    first.send_signal(signal.SIGTERM)
    first.wait(timeout=120)
  steps = [json.loads(l)["step"] for l in (work / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps)), "metrics.jsonl holds one run's steps, each once"


# Losses 1-4 follow the learning rates of steps 0-2 (0, peak / 2, peak), the same for any num_steps.
SCHEDULE_FREE_STEPS = (1, 2, 3, 4)


@pytest.mark.slow
def test_two_processes_equal_one_and_sigterm_to_one_stops_both_at_the_same_step(tmp_path, tiny_run):
  port = _free_port()
  work = tmp_path / "two"
  long_run = {"train.num_steps": 400, "train.checkpoint_every_steps": 1000}
  distributed = [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2"]
  procs = [_main(work, *distributed, f"--process_id={i}", wait=False, capture=True, **long_run) for i in range(2)]
  try:
    _wait_for_step(work, max(SCHEDULE_FREE_STEPS), procs)
    # A scheduler may tell only one of them; JAX's preemption service tells the other.
    procs[1].send_signal(signal.SIGTERM)
    codes = [p.wait(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [128 + signal.SIGTERM] * 2, (codes, procs[0].stderr_path.read_text()[-2000:])
  saved = tiny_runs.saved_steps(work)
  assert len(saved) == 1 and saved[0] < 400, saved
  data_iter = work / "checkpoints" / str(saved[0]) / "data_iter"
  assert sorted(p.name for p in data_iter.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  assert f"stopped by SIGTERM at step {saved[0]}" in procs[0].stdout_path.read_text()
  # Two processes of one device each train like the one-process shared run.
  two = tiny_runs.losses_by_step(work)
  for step in SCHEDULE_FREE_STEPS:
    assert abs(two[step] - tiny_run.losses[step]) <= 1e-5, (step, two[step], tiny_run.losses[step])


def _descendants(pid):
  """{pid: start time} of every living descendant of ``pid``, from /proc (psutil may be absent)."""
  children = {}
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      stat = _proc_stat(int(entry))
      if stat:
        children.setdefault(int(stat[1]), []).append(int(entry))
  found, todo = {}, [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      stat = _proc_stat(child)
      if stat:
        found[child] = stat[19]
        todo.append(child)
  return found


def _proc_stat(pid):
  """The fields of /proc/<pid>/stat after the command name, from the state on; None when gone or a zombie."""
  try:
    text = pathlib.Path(f"/proc/{pid}/stat").read_text()
  except OSError:
    return None
  fields = text[text.rindex(")") + 2 :].split()
  return None if fields[0] in ("Z", "X") else fields


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="walks /proc")
def test_kill_9_of_the_trainer_takes_its_workers_along(tmp_path):
  work = tmp_path / "orphans"
  proc = _main(
    work,
    "--config.train.num_steps=100000",
    "--config.train.checkpoint_every_steps=100000",
    "--config.train.data_workers=2",
    wait=False,
    capture=True,
  )
  try:
    _wait_for_step(work, 2, [proc])
    children = _descendants(proc.pid)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  # Two Grain workers and multiprocessing's resource tracker, at least.
  assert len(children) >= 3, children
  deadline = time.time() + 10
  alive = children
  while alive and time.time() < deadline:
    time.sleep(0.2)
    # The start time tells a survivor from a new process that got a reused pid.
    alive = {pid: start for pid, start in alive.items() if (_proc_stat(pid) or {19: None})[19] == start}
  assert not alive, f"still running 10 s after kill -9 of the trainer: {sorted(alive)}"


def test_console_is_quiet_by_default(tiny_run):
  # The session's shared training run, started without --verbosity, logged no absl info line.  With
  # --verbosity=0 the info lines do reach the console: test_summary.py's command line checks that.
  assert "mode=train" not in tiny_run.stderr and not re.search(r"^I\d{4} ", tiny_run.stderr, re.M)


@pytest.mark.slow
def test_incompatible_checkpoint_is_a_clear_error(tmp_path, tiny_run):
  work = tiny_runs.copy_workdir(tiny_run.workdir, tmp_path / "run")
  second = _main(work, "--config.model.image.adapter_dim=8", **{"train.num_steps": NUM_STEPS + 2})
  assert second.returncode != 0
  assert "does not fit this config" in second.stderr and "adapter" in second.stderr


@pytest.mark.slow
def test_nan_loss_stops_with_step_and_saves_nothing(tmp_path):
  from clinvla_jax import train

  config = tiny_runs.config(**{"train.checkpoint_every_steps": 1})
  config.model.logit_scale_init = float("nan")
  with pytest.raises(train.NonFiniteLossError, match="at step 1"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not any((tmp_path / "checkpoints").glob("[0-9]*"))


@pytest.mark.slow
def test_records_tokenized_past_the_word_table_stop_training_before_a_step(tmp_path):
  from clinvla_jax import train

  # The tiny records are tokenized with the bundled 30,522-token vocabulary: a table of 2,000 rows cannot read them.
  config = tiny_runs.config(**{"model.text.vocab_size": 2000})
  with pytest.raises(ValueError, match=r"token id \d+, but model.text.vocab_size = 2000"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not any((tmp_path / "checkpoints").glob("[0-9]*"))


def test_token_ids_are_checked_against_the_word_table():
  from clinvla_jax import train

  ids = np.array([[101, 2000, 102, 0]], np.int32)
  train.check_token_ids(ids, 2001)
  with pytest.raises(ValueError, match="token id 2000, but model.text.vocab_size = 2000"):
    train.check_token_ids(ids, 2000)


def test_adapter_only_checkpoint_holds_no_backbone(tmp_path, tiny_run):
  work = tiny_runs.copy_workdir(tiny_run.workdir, tmp_path / "run")
  assert (work / "checkpoints" / str(NUM_STEPS) / "state").is_dir()
  from clinvla_jax.checkpoint import Checkpointer

  ckpt = Checkpointer(str(work))
  meta = ckpt.manager.item_metadata(NUM_STEPS)["state"]
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


def test_training_shortens_tokens_like_evaluation():
  from clinvla_jax import train
  from clinvla_jax.data.records import fit_token_length

  ids = np.array([[101, 5, 6, 7, 8, 102, 0, 0], [101, 9, 102, 0, 0, 0, 0, 0]], np.int32)
  mask = (ids > 0).astype(np.int32)
  out = train.fit_text_length({"input_ids": ids, "attention_mask": mask, "labels": np.zeros((2, 1))}, 4)
  want_ids, want_mask = fit_token_length(ids, mask, 4)
  np.testing.assert_array_equal(out["input_ids"], want_ids)
  np.testing.assert_array_equal(out["attention_mask"], want_mask)
  assert out["input_ids"][0, -1] == 102 and out["input_ids"].shape == (2, 4)
  assert train.fit_text_length({"input_ids": ids, "attention_mask": mask}, 8)["input_ids"] is ids
