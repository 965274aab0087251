"""The training loop: no implicit transfers, device prefetch, non-finite windows, damaged checkpoints,
the workdir lock, best-checkpoint ranking, init_state, peak FLOP table.  Signal tests are in test_train.py."""

import json
import os

import jax
import numpy as np
import pytest

from clinvla_jax import checkpoint, optim, perf, sharding, train, weights, workdir_lock
from clinvla_jax.data import pipeline
from clinvla_jax.data.prefetch import DevicePrefetcher
from clinvla_jax.data.source import list_shards

import tiny_runs


def _single_device_setup(config):
  return train.TrainSetup(config, mesh=sharding.make_mesh(config.mesh, jax.devices()[:1]))


def _loader(config):
  return pipeline.make_train_loader(
    list_shards(config.data.train, split="train"),
    global_batch_size=config.optim.batch_size,
    seed=0,
    shard_index=0,
    shard_count=1,
  )


@pytest.fixture(autouse=True)
def _one_device(monkeypatch):
  # The loop builds its mesh from the config; one device keeps these tests quick.
  monkeypatch.setattr(sharding, "make_mesh", _first_device_mesh(sharding.make_mesh))


def _first_device_mesh(make_mesh):
  def wrapped(mesh_cfg, devices=None):
    return make_mesh(mesh_cfg, devices if devices is not None else jax.devices()[:1])

  return wrapped


def test_train_step_makes_no_implicit_transfer():
  config = tiny_runs.config()
  setup = _single_device_setup(config)
  state = setup.init_state()
  host = next(iter(_loader(config)))
  batch = sharding.global_batch(
    train.fit_text_length(host, setup.model_config.text.max_len), setup.mesh, train.MODEL_INPUTS
  )
  compiled, _ = setup.compile(state, batch)
  with jax.transfer_guard("disallow"):
    state, metrics = setup.step(state, batch)
    state, metrics = compiled(state, setup.frozen, batch)
  assert int(jax.device_get(state["step"])) == 2
  # A guard that cannot fail proves nothing: the same call with a host batch is refused.
  host_batch = {k: np.asarray(v) for k, v in batch.items()}
  with jax.transfer_guard("disallow"), pytest.raises(Exception, match="Disallowed host-to-device"):
    compiled(state, setup.frozen, host_batch)


@pytest.mark.slow
def test_loop_runs_under_a_disallowing_transfer_guard(tmp_path):
  # The step loop (batch placement, step, metric fetch) makes only explicit
  # transfers.  On CPU a device->host read is no transfer, so this guard
  # catches implicit host->device ones here, and both kinds on accelerators.
  config = tiny_runs.config(
    **{
      "train.num_steps": 5,
      "train.log_every_steps": 2,
      "train.checkpoint_every_steps": 100,
      "train.transfer_guard": "disallow",
    }
  )
  last = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(last["loss"])
  assert sorted(tiny_runs.losses_by_step(tmp_path)) == [1, 2, 4, 5]
  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert records[0]["compile_time_s"] > 0 and records[0]["memory/temp"] > 0
  # Compilation is timed apart from the steps (no timing comparison: this machine is noisy):
  # reported once, on the first line, while every line has its step time.
  assert all(r["step_time_s"] > 0 for r in records)
  assert not any("compile_time_s" in r for r in records[1:])


def test_init_state_can_be_called_twice():
  config = tiny_runs.config()
  setup = _single_device_setup(config)
  host = next(iter(_loader(config)))
  batch = sharding.global_batch(
    train.fit_text_length(host, setup.model_config.text.max_len), setup.mesh, train.MODEL_INPUTS
  )
  first, m1 = setup.step(setup.init_state(), batch)
  second, m2 = setup.step(setup.init_state(), batch)
  assert float(m1["loss"]) == float(m2["loss"])
  jax.tree_util.tree_map(
    np.testing.assert_array_equal, jax.device_get(first["params"]), jax.device_get(second["params"])
  )


class _CountingIterator:
  """A host iterator with Grain-like get_state/set_state (the index of the next batch)."""

  def __init__(self, n=100):
    self.position, self.n = 0, n

  def __next__(self):
    if self.position >= self.n:
      raise StopIteration
    self.position += 1
    return {"x": np.full((2,), self.position - 1)}

  def get_state(self):
    return json.dumps({"position": self.position}).encode()

  def set_state(self, state):
    self.position = json.loads(state)["position"]


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetcher_reports_the_position_after_the_consumed_batch(depth):
  host = _CountingIterator()
  placed = []
  prefetcher = DevicePrefetcher(host, lambda b: placed.append(int(b["x"][0])) or b, depth=depth)
  got = [int(next(prefetcher)["x"][0]) for _ in range(5)]
  assert got == [0, 1, 2, 3, 4]
  # It reads ahead by `depth` ...
  assert host.position == 5 + depth and placed == list(range(5 + depth))
  # ... but reports the position after batch 4, so a restore continues at 5.
  state = prefetcher.get_state()
  assert json.loads(state)["position"] == 5
  resumed = DevicePrefetcher(_CountingIterator(), lambda b: b, depth=depth)
  resumed.set_state(state)
  assert [int(next(resumed)["x"][0]) for _ in range(3)] == [5, 6, 7]


def test_prefetcher_over_the_grain_loader_resumes_exactly():
  config = tiny_runs.config()
  loader = _loader(config)
  reference = [b["patches"] for b, _ in zip(loader.iterator(), range(5))]
  prefetcher = DevicePrefetcher(loader.iterator(), lambda b: b, depth=2)
  for _ in range(2):
    next(prefetcher)
  resumed = loader.iterator(prefetcher.get_state())
  for k in range(2, 5):
    np.testing.assert_array_equal(next(resumed)["patches"], reference[k])


def test_nan_inside_a_log_window_names_the_step_and_the_window(tmp_path, monkeypatch):
  # Records hold uint8 pixels, so the NaN is planted in step 3's metrics as
  # they enter the window; the logit-scale test in test_train.py makes a real one.
  add = train.MetricWindow.add

  def add_with_nan_at_step_3(self, step, metrics):
    if step == 3:
      metrics = dict(metrics, loss=metrics["loss"] * jax.numpy.nan)
    add(self, step, metrics)

  monkeypatch.setattr(train.MetricWindow, "add", add_with_nan_at_step_3)
  # The shared run's schedule, so the train step is the one the other tests compiled; step 3 ends it.
  config = tiny_runs.config(**{"train.log_every_steps": 4, "train.checkpoint_every_steps": 100})
  with pytest.raises(train.NonFiniteLossError, match=r"loss at step 3 \(log window steps 2-4\)"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not any((tmp_path / "checkpoints").glob("[0-9]*"))


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, tiny_run, capsys):
  # The shared tiny run (checkpoints 8, 10, 12) with its latest checkpoint damaged.
  _, previous, latest = tiny_runs.KEPT_STEPS
  work = tiny_runs.copy_workdir(tiny_run.workdir, tmp_path / "damaged")
  assert tiny_runs.truncate_arrays(work / "checkpoints" / str(latest)) > 0
  logged = len((work / "metrics.jsonl").read_text().splitlines())
  capsys.readouterr()
  train.train_and_evaluate(tiny_runs.config(), str(work))
  out = capsys.readouterr().out
  assert f"checkpoint step {latest} cannot be restored" in out and f"resuming from step {previous}" in out
  assert len(list((work / "damaged_checkpoints").iterdir())) == 1
  # The steps after the intact one rerun from it (the lines logged now) and match the uninterrupted run.
  rerun = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()[logged:]]
  rerun = {r["step"]: r["loss"] for r in rerun if "loss" in r}
  assert sorted(rerun) == list(range(previous + 1, latest + 1))
  for step in range(previous + 1, latest + 1):
    assert rerun[step] == tiny_run.losses[step], step


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path, tiny_run):
  work = tiny_runs.copy_workdir(tiny_run.workdir, tmp_path / "damaged")
  for step in tiny_runs.saved_steps(work):
    tiny_runs.truncate_arrays(work / "checkpoints" / str(step))
  oldest, previous, latest = tiny_runs.KEPT_STEPS
  with pytest.raises(checkpoint.NoIntactCheckpointError, match=f"step {latest}") as raised:
    train.train_and_evaluate(tiny_runs.config(**{"train.num_steps": tiny_runs.NUM_STEPS + 2}), str(work))
  assert f"step {previous}" in str(raised.value) and f"step {oldest}" in str(raised.value)
  assert not (work / "checkpoints" / str(tiny_runs.NUM_STEPS + 2)).exists()


def test_workdir_lock_names_its_holder_and_is_released(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path)):
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f"pid {os.getpid()}"):
      workdir_lock.WorkdirLock(str(tmp_path)).acquire()
    with pytest.raises(workdir_lock.WorkdirLockedError, match="in use by another trainer"):
      train.train_and_evaluate(tiny_runs.config(), str(tmp_path))
  workdir_lock.WorkdirLock(str(tmp_path)).acquire().release()


def test_restored_evaluation_variables_equal_the_trainers_bit_for_bit(tiny_run):
  # weights.restore_variables builds no trainer: its frozen backbone comes from initial_variables and its
  # trainable tree from Checkpointer.restore_params.  Both must be what the trainer itself restores.
  config = tiny_runs.config()
  got, step = weights.restore_variables(config, str(tiny_run.workdir))
  setup = train.TrainSetup(config)
  ckpt = checkpoint.Checkpointer(str(tiny_run.workdir), async_save=False)
  try:
    state, _ = ckpt.restore(step, setup.abstract_state)
  finally:
    ckpt.close()
  want = setup.variables(state)
  got_leaves = jax.tree_util.tree_leaves_with_path(got)
  assert [k for k, _ in got_leaves] == [k for k, _ in jax.tree_util.tree_leaves_with_path(want)]
  for (path, a), b in zip(got_leaves, jax.tree_util.tree_leaves(want)):
    assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))
  # The checkpoint's trainable part is the trained one, not the initialisation.
  trainable, _ = optim.split_params(want["params"], list(config.optim.param_groups))
  initial, _ = optim.split_params(setup.variables(setup.init_state())["params"], list(config.optim.param_groups))
  assert any(
    not np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(trainable), jax.tree_util.tree_leaves(initial))
  )


def test_evaluation_needs_no_lock(tmp_path, tiny_run):
  work = tiny_runs.copy_workdir(tiny_run.workdir, tmp_path / "run")
  with workdir_lock.WorkdirLock(str(work)):
    _, step = weights.restore_variables(tiny_runs.config(), str(work))
  assert step == tiny_runs.NUM_STEPS


@pytest.mark.slow
def test_best_checkpoint_ranks_every_evaluated_step(tmp_path):
  # Evaluation every 2 steps, checkpoints only at the end: the best evaluated
  # step (2) must still be kept, beside the latest.
  scores = {2: 0.9, 4: 0.1, 6: 0.5}
  calls = []

  def evaluate(variables, outdir):
    step = int(os.path.basename(outdir).split("_")[1])
    calls.append(step)
    return {"score": scores[step]}

  config = tiny_runs.config(
    **{
      "train.num_steps": 6,
      "train.checkpoint_every_steps": 100,
      "train.keep_checkpoints": 1,
      "train.best_metric": "score",
    }
  )
  train.train_and_evaluate(config, str(tmp_path), evaluate_fn=evaluate, evaluate_every_steps=2)
  assert calls == [2, 4, 6]
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [2, 6]


@pytest.mark.parametrize(
  "kind,peak",
  [
    ("TPU v5 lite", 197e12),
    ("TPU v6 lite", 918e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L4", 121e12),
    ("cpu", 0.0),
  ],
)
def test_peak_flops_know_the_device_kinds_jax_reports(kind, peak):
  assert perf.peak_flops_for_kind(kind) == peak
