"""The training loop: sharded init, jitted step, logging, evaluation hook, checkpoints.

    python -m clinvla_jax.main --config=configs/demo.py --workdir=runs/demo

Rerunning the same command resumes from the latest checkpoint in the workdir:
trainable parameters, optimizer state, step and the data iterator are
restored, so the run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import sys
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from clinvla_jax import api, console, losses, optim, perf, preemption, sharding, workdir_lock
from clinvla_jax.checkpoint import Checkpointer, checkpoint_bytes
from clinvla_jax.convert import pretrained
from clinvla_jax.data import records, source
from clinvla_jax.data.prefetch import DevicePrefetcher
from clinvla_jax.data import augment as augment_lib
from clinvla_jax.data.records import fit_token_length
from clinvla_jax.model import flops as flops_lib
from clinvla_jax.model import layers
from clinvla_jax.model.clinvla import matmul_ready_params
from clinvla_jax.predict import PredictFn, config_text_buckets

MODEL_INPUTS = ("patches", "patch_idx", "view_valid", "input_ids", "attention_mask")


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or infinite loss."""


def make_train_step(config, model, tx, schedules=None):
  """``train_step(state, frozen, batch) -> (state, metrics)``, pure and jittable.

  With ``schedules`` ({group: optax schedule}) the metrics also hold each
  group's learning rate at this step (``lr_<group>``), computed on the
  device so that logging needs no host-side schedule evaluation.

  state = {"step", "params" (trainable only), "opt_state"}.  Gradients are
  taken with respect to ``state["params"]`` alone; the frozen backbone is an
  ordinary input, so XLA computes no weight gradients for it.  Dropout keys
  derive from (config.seed, step), so a resumed run draws the same masks.
  """
  loss_cfg = config.loss
  seed = int(config.seed)

  def train_step(state, frozen, batch):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(seed), step)

    def loss_fn(trainable):
      params = optim.merge_params(trainable, frozen)
      out = model.apply(
        {"params": params}, *(batch[k] for k in MODEL_INPUTS), deterministic=False, rngs={"dropout": rng}
      )
      loss, metrics = losses.clinvla_loss(out, loss_cfg)
      metrics["temperature_1"], metrics["temperature_2"], metrics["temperature_3"] = (
        out["local_temperatures"][0],
        out["local_temperatures"][1],
        out["local_temperatures"][2],
      )
      return loss, metrics

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    for group, schedule in (schedules or {}).items():
      metrics[f"lr_{group}"] = schedule(step)
    return {"step": step + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


class TrainSetup:
  """Everything a run needs, built once: mesh, model, sharded state, jitted step."""

  def __init__(self, config, *, mesh: Optional[jax.sharding.Mesh] = None):
    self.config = config
    self.mesh = mesh or sharding.make_mesh(config.mesh)
    sharding.check_batch_divides(self.mesh, config.optim.batch_size)
    self.rules = sharding.logical_rules(config)
    self.model = api.build_model(config)
    self.model_config = api.model_config(config)
    rules = list(config.optim.param_groups)

    boxed = api.abstract_params(config)["params"]
    full_shardings = sharding.param_shardings(boxed, self.mesh, self.rules)
    abstract = nn.meta.unbox(boxed)
    optim.check_rules(abstract, rules, config.optim.learning_rates)
    self.trainable_shardings, self.frozen_shardings = optim.split_params(full_shardings, rules)

    params = self._initial_params(full_shardings)
    self.trainable_init, self.frozen_params = optim.split_params(params, rules)
    # What the step reads: frozen matmul kernels already in their matmul dtype,
    # cast once here rather than at every step (the float32 originals stay in
    # frozen_params for evaluation and export).
    self.frozen = matmul_ready_params(self.frozen_params, self.model_config)
    self.tx, self.schedules = optim.make_optimizer(
      config.optim, self.trainable_init, rules, int(config.train.num_steps)
    )

    abstract_trainable, _ = optim.split_params(abstract, rules)
    abstract_opt = jax.eval_shape(self.tx.init, abstract_trainable)
    replicated = sharding.replicated(self.mesh)
    # The optimizer state follows its parameters' shardings: let XLA propagate
    # them through tx.init and read back what it chose.
    abstract_trainable_sharded = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_trainable, self.trainable_shardings
    )
    opt_shardings = jax.jit(self.tx.init).lower(abstract_trainable_sharded).compile().output_shardings
    opt_shardings = jax.tree_util.tree_map(
      lambda s: s if isinstance(s, jax.sharding.NamedSharding) else replicated, opt_shardings
    )
    self.state_shardings = {"step": replicated, "params": self.trainable_shardings, "opt_state": opt_shardings}
    self.abstract_state = jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_trainable, "opt_state": abstract_opt},
      self.state_shardings,
    )

    batch_shardings = {
      k: sharding.batch_sharding(self.mesh, nd)
      for k, nd in (("patches", 4), ("patch_idx", 3), ("view_valid", 2), ("input_ids", 2), ("attention_mask", 2))
    }
    self.batch_shardings = batch_shardings
    step_fn = make_train_step(config, self.model, self.tx, self.schedules)
    self._step = jax.jit(
      step_fn,
      in_shardings=(self.state_shardings, self.frozen_shardings, batch_shardings),
      out_shardings=(self.state_shardings, replicated),
      donate_argnums=(0,),
    )

  def _initial_params(self, full_shardings):
    """Sharded random init (no full copy on one device), then pretrained weights if configured."""
    init = api.init_fn(self.model_config, boxed=False)
    # Outside the logical-rules context: Flax's DenseGeneral initialises a flat
    # kernel before reshaping it, which a rank-4 constraint would reject;
    # out_shardings places the result anyway.
    params = jax.jit(lambda key: init(key)["params"], out_shardings=full_shardings)(
      jax.random.key(int(self.config.seed))
    )
    if not pretrained.wants_pretrained(self.config):
      return params
    host = {"params": jax.tree_util.tree_map(np.asarray, jax.device_get(params))}
    host = pretrained.load_configured_weights(host, self.config)
    return jax.tree_util.tree_map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx, x=x: np.asarray(x)[idx]),
      host["params"],
      full_shardings,
    )

  @contextlib.contextmanager
  def context(self):
    """The mesh and the logical axis rules, for tracing and running the step."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield

  def init_state(self):
    """A fresh training state; every call returns new buffers.

    The step donates its state, so handing out ``trainable_init`` itself would
    leave it deleted after the first step (and a second call with dead arrays).
    """
    with self.context():
      params = jax.jit(lambda p: jax.tree_util.tree_map(jnp.copy, p), out_shardings=self.state_shardings["params"])(
        self.trainable_init
      )
      opt_state = jax.jit(self.tx.init, out_shardings=self.state_shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), self.state_shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}

  def compile(self, state, batch) -> Tuple[Any, float]:
    """(compiled step, seconds): compiled ahead of time, so no step's time includes compilation."""
    with self.context():
      start = time.perf_counter()
      compiled = self._step.lower(state, self.frozen, batch).compile()
    return compiled, time.perf_counter() - start

  def step(self, state, batch):
    with self.context():
      return self._step(state, self.frozen, batch)

  def variables(self, state) -> Dict[str, Any]:
    return {"params": optim.merge_params(state["params"], self.frozen_params)}

  @functools.cached_property
  def predict_fn(self) -> PredictFn:
    """Embeddings on this run's mesh with its logical rules: variables sharded as in training."""
    return PredictFn(self.model_config, self.mesh, self.rules, config_text_buckets(self.config))


def fit_text_length(batch, max_len: int):
  """Cuts token columns to the text tower's length (records carry 128 tokens).

  The same shortening as evaluation (``data.records.fit_token_length``: a cut
  row still ends on its [SEP]), so training and evaluation see one layout.
  """
  if batch["input_ids"].shape[1] <= max_len:
    return batch
  ids, mask = fit_token_length(batch["input_ids"], batch["attention_mask"], max_len)
  return dict(batch, input_ids=ids, attention_mask=mask)


def _json_safe(config) -> Dict[str, Any]:
  return json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort") else dict(config)


def precision_description(mcfg) -> str:
  """The precision policy of each tower, in words (one policy named once)."""
  image, text = (layers.tower_precision(t) for t in (mcfg.image, mcfg.text))
  if image == text:
    return image.describe()
  return f"image tower {image.describe()}; text tower {text.describe()}"


def _param_counts(setup: TrainSetup) -> Tuple[int, int]:
  trainable = api.count_params(setup.trainable_init)
  frozen = api.count_params(setup.frozen)
  return trainable + frozen, trainable


def _tensorboard_writer_class():
  """tensorboardX's SummaryWriter, imported without PyTorch.  tensorboardX imports torch when it is installed
  (3 s of every training process's start on 2 CPU cores) only for a type hint; the writer logs floats."""
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX expects without torch
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]  # a later `import torch` imports it as usual
  return SummaryWriter


class MetricWriter:
  """metrics.jsonl + TensorBoard event files in the workdir (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      try:
        self.tb = _tensorboard_writer_class()(os.path.join(workdir, "tensorboard"))
      except ImportError:
        logging.warning("tensorboardX not installed: no TensorBoard event files")

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self.tb is not None:
      for k, v in metrics.items():
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
          self.tb.add_scalar(k, float(v), int(step))
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()


def _train_paths(config):
  if not config.data.train:
    raise ValueError(
      "config.data.train is empty: set it to a converter output folder "
      "(e.g. --config.data.train=/data/mimic_cxr_converted)"
    )
  return source.list_shards(config.data.train, split=config.data.train_split or None)


def eval_schedule(config) -> Dict[str, int]:
  """{evaluator name: every_steps} of the ``config.evals`` entries that training runs (every_steps > 0)."""
  # The evaluation side imports the input pipeline (Grain); the train step itself runs without it.
  from clinvla_jax.evaluate import evaluators  # pylint: disable=g-import-not-at-top

  return {name: ev.every_steps for name, ev in evaluators.build_evaluators(config).items() if ev.every_steps > 0}


def periodic_evaluation(config, predict_fn: PredictFn, evaluate_fn=None, evaluate_every_steps: int = 0):
  """step -> the evaluation due at that step, ``(variables, outdir) -> metrics``, or None.

  By default each evaluator of ``config.evals`` runs every ``every_steps``,
  through the run's own ``predict_fn``, and a step runs the evaluators due
  together.  A custom ``evaluate_fn`` runs every ``evaluate_every_steps``.
  """
  # The evaluation side imports the input pipeline (Grain); the train step itself runs without it.
  from clinvla_jax.evaluate import run as eval_run  # pylint: disable=g-import-not-at-top

  if evaluate_fn is not None:
    every = int(evaluate_every_steps)
    return lambda step: evaluate_fn if every > 0 and step % every == 0 else None
  schedule = eval_schedule(config)
  if not schedule:
    return lambda step: None

  def due(step: int):
    names = [name for name, every in schedule.items() if step % every == 0]
    if not names:
      return None
    return lambda variables, outdir: eval_run.run_evaluation(
      config, variables, outdir, predict_fn=predict_fn, names=names
    )

  return due


def write_learning_curves(workdir: str) -> None:
  """learning_curves.png from metrics.jsonl: losses and held-out P@5 (with chance) against step."""
  # The evaluation side imports the input pipeline (Grain); the train step itself runs without it.
  from clinvla_jax.evaluate import report  # pylint: disable=g-import-not-at-top

  try:
    report.learning_curves_figure(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "learning_curves.png"))
  except Exception as e:  # pylint: disable=broad-except
    # A figure must never end a training run.
    logging.warning("learning_curves.png not written: %s", e)


class TrainingPreempted(Exception):
  """SIGTERM/SIGINT stopped training after a checkpoint was saved; rerun the same command to resume."""

  def __init__(self, signum: int, step: int, checkpoint: str):
    self.signum, self.step, self.checkpoint = signum, step, checkpoint
    super().__init__(
      f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint saved to {checkpoint}; "
      "rerun the same command to resume"
    )


def memory_metrics(compiled) -> Dict[str, float]:
  """XLA's per-device memory accounting of a compiled step as ``memory/<kind>`` bytes; {} where unavailable."""
  try:
    mem = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    mem = None
  if mem is None:
    return {}
  return {
    f"memory/{k}": float(getattr(mem, f"{k}_size_in_bytes"))
    for k in ("argument", "output", "alias", "temp", "generated_code")
  }


def memory_line(memory: Dict[str, float]) -> str:
  """One console line from ``memory_metrics``."""
  if not memory:
    return "memory analysis unavailable on this backend"
  mib = lambda kind: f"{memory[f'memory/{kind}'] / 2**20:,.1f} MiB"  # pylint: disable=unnecessary-lambda-assignment
  return (
    f"per device: arguments {mib('argument')}, outputs {mib('output')} (aliased {mib('alias')}), "
    f"temporaries {mib('temp')}, code {mib('generated_code')}"
  )


class MetricWindow:
  """Step metrics kept on the devices until a log step, then fetched in one transfer.

  The host never waits for a step it has just dispatched: the window ending at
  log step s is fetched after step s + 1 has been dispatched (``flush_due``),
  or at once where the loop needs the values (checkpoint, evaluation, end).
  Every step of a fetched window is checked for non-finite values.
  """

  def __init__(self, first_step: int):
    self.pending: list = []
    self.window_first = first_step
    self.flush_due: Optional[int] = None
    self.clock = time.perf_counter()

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def fetch(self, up_to: int, last_checkpoint: Optional[int]) -> Tuple[Dict[str, float], int, float]:
    """(host metrics of step ``up_to``, steps in the window, seconds) after checking every step."""
    taken = [(s, m) for s, m in self.pending if s <= up_to]
    self.pending = [(s, m) for s, m in self.pending if s > up_to]
    host = jax.device_get([m for _, m in taken])
    now = time.perf_counter()
    first = self.window_first
    for (step, _), values in zip(taken, host):
      bad = [k for k, v in values.items() if not np.all(np.isfinite(v))]
      if bad:
        raise NonFiniteLossError(
          f"non-finite {', '.join(bad)} at step {step} (log window steps {first}-{up_to}); parts: "
          + ", ".join(f"{k}={float(v):.4g}" for k, v in values.items())
          + f". Nothing after the last checkpoint (step {last_checkpoint}) was saved."
        )
    seconds = now - self.clock
    self.window_first, self.clock, self.flush_due = up_to + 1, now, None
    return ({k: float(v) for k, v in host[-1].items()} if host else {}), len(taken), seconds

  def restart_clock(self) -> None:
    # Evaluation and the blocking part of a save are not step time.
    self.clock = time.perf_counter()


def _acquire_workdir_lock(workdir: str):
  """Process 0 locks the workdir; every process learns whether it succeeded, and fails alike if not."""
  lock, error = None, None
  if jax.process_index() == 0:
    try:
      lock = workdir_lock.WorkdirLock(workdir).acquire()
    except workdir_lock.WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = workdir_lock.WorkdirLockedError(f"{workdir} is in use by another trainer (process 0 could not lock it)")
  if error is not None:
    raise error
  return lock


def train_and_evaluate(
  config, workdir: str, *, evaluate_fn=None, evaluate_every_steps: int = 0, host_batches=None
) -> Dict[str, float]:
  """Trains (resuming from ``workdir`` if it holds checkpoints); returns the last logged metrics.

  Evaluation: each evaluator of ``config.evals`` every its ``every_steps``;
  or, with ``evaluate_fn(variables, outdir) -> metrics``, that function every
  ``evaluate_every_steps`` (0: never).

  ``host_batches``: an iterator of host batches to use instead of the
  configured training data (benchmarks); its position is not checkpointed
  unless it has ``get_state``/``set_state``.

  Raises ``TrainingPreempted`` after saving when SIGTERM or SIGINT arrived,
  ``NonFiniteLossError`` on a non-finite loss, and
  ``workdir_lock.WorkdirLockedError`` when another trainer holds the workdir.
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  lock = _acquire_workdir_lock(workdir)
  log_path = os.path.join(workdir, console.log_file_name(jax.process_index()))
  console.add_log_file(log_path)
  try:
    return _train(config, workdir, (evaluate_fn, evaluate_every_steps), host_batches)
  finally:
    console.remove_log_file(log_path)
    if lock is not None:
      lock.release()


def _eval_line(step: int, eval_metrics: Dict[str, float], best_metric: str) -> str:
  keys = [k for k in eval_metrics if k.endswith("/P@5") or k.endswith("/AUC") or k == best_metric]
  keys = sorted(set(keys))[:6] or sorted(eval_metrics)[:6]
  return f"eval step {step}: " + ", ".join(f"{k} {eval_metrics[k]:.4f}" for k in keys)


def _train(config, workdir: str, custom_evaluation, host_batches) -> Dict[str, float]:
  # Grain only where a run reads shards: the train step and the benchmarks run without it.
  from clinvla_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  is_main = jax.process_index() == 0
  say = print if is_main else (lambda *a, **k: None)
  setup = TrainSetup(config)
  # Built before the first step, so a bad evaluator config fails now, not at its first evaluation.
  evaluation_due = periodic_evaluation(config, setup.predict_fn, *custom_evaluation)
  total, trainable = _param_counts(setup)
  logging.info(
    "parameters: %s total, %s trainable (%.2f %%); mesh %s",
    f"{total:,}",
    f"{trainable:,}",
    100 * trainable / total,
    dict(setup.mesh.shape),
  )
  say(
    f"parameters: {total:,} total, {trainable:,} trainable ({100 * trainable / total:.2f} %); "
    f"mesh {dict(setup.mesh.shape)}; devices {jax.device_count()} ({jax.devices()[0].device_kind}); "
    f"processes {jax.process_count()}",
    flush=True,
  )
  precision_line = precision_description(setup.model_config)
  logging.info("precision: %s", precision_line)
  say(f"precision: {precision_line}", flush=True)

  train = config.train
  if host_batches is None:
    augment = augment_lib.AugmentSpec.from_config(config.data.get("augment"))
    logging.info("training views: %s", augment_lib.describe(augment))
    say(f"training views: {augment_lib.describe(augment)}", flush=True)
    loader = pipeline.make_train_loader(
      _train_paths(config),
      global_batch_size=int(config.optim.batch_size),
      seed=int(config.seed),
      mask_ratio=float(config.data.mask_ratio),
      worker_count=int(train.data_workers),
      augment=augment,
    )
    data_iter = loader.iterator()
  else:
    data_iter = host_batches
  # A data position is saved (and restored) only for iterators that have one.
  checkpoint_data = hasattr(data_iter, "get_state") and hasattr(data_iter, "set_state")
  checkpointer = Checkpointer(
    workdir, keep=int(train.keep_checkpoints), best_metric=train.best_metric, best_mode=train.best_mode
  )
  try:
    state, restored_iter, latest = checkpointer.restore_latest_intact(
      setup.abstract_state, data_iter if checkpoint_data else None
    )
    data_iter = restored_iter if checkpoint_data else data_iter
    if latest is not None:
      logging.info("resumed from step %d", latest)
      say(f"resumed from {checkpointer.directory}/{latest}", flush=True)
    else:
      state = setup.init_state()
    say(
      f"adapter-only checkpoint: {checkpoint_bytes(state) / 2**20:.1f} MiB "
      f"(trainable params + optimizer state; the full parameter set is "
      f"{checkpoint_bytes(setup.variables(state)) / 2**20:.1f} MiB)",
      flush=True,
    )
    batches = DevicePrefetcher(data_iter, _placer(setup), depth=int(train.prefetch_to_device))
    return _TrainLoop(config, workdir, setup, checkpointer, evaluation_due, say).run(
      state, batches, checkpoint_data, latest
    )
  finally:
    checkpointer.wait()
    checkpointer.close()


def _placer(setup: TrainSetup):
  max_len, table_rows = setup.model_config.text.max_len, setup.model_config.text.vocab_size

  def place(batch):
    check_token_ids(batch["input_ids"], table_rows)
    return sharding.global_batch(fit_text_length(batch, max_len), setup.mesh, MODEL_INPUTS)

  return place


def check_token_ids(input_ids, table_rows: int) -> None:
  """Raises when a batch holds token ids past the word table (their rows would be NaN, and so the loss).

  Records are tokenized when converted (``data_prep``, the bundled uncased
  vocabulary unless told otherwise): a text tower sized for another
  vocabulary (configs/base.py: BioBERT's 28,996) cannot read them.
  """
  top = int(np.max(input_ids)) if np.size(input_ids) else 0
  if top >= table_rows:
    raise ValueError(
      f"the training records hold token id {top}, but model.text.vocab_size = {table_rows}: they were tokenized "
      "with a larger vocabulary than the text tower's. Convert them with the text weights' vocab.txt "
      f"(data_prep --vocab), or set --config.model.text.vocab_size to that vocabulary's size."
    )


class _TrainLoop:
  """Steps from a state to ``config.train.num_steps``: metric windows, evaluations, checkpoints, preemption."""

  def __init__(self, config, workdir: str, setup: TrainSetup, checkpointer, evaluation_due, say):
    self.config, self.workdir, self.setup = config, workdir, setup
    self.checkpointer, self.evaluation_due, self.say = checkpointer, evaluation_due, say
    train = config.train
    self.is_main = jax.process_index() == 0
    self.num_steps = int(train.num_steps)
    self.batch_size = int(config.optim.batch_size)
    self.log_every, self.ckpt_every = int(train.log_every_steps), int(train.checkpoint_every_steps)
    kept = records.num_kept_patches(float(config.data.mask_ratio), setup.model_config.image.num_patches)
    self.flops_per_step = flops_lib.train_step_flops_per_study(setup.model_config, kept_patches=kept) * self.batch_size
    self.peak = perf.peak_flops_per_device(float(train.peak_flops_per_device)) * jax.device_count()
    self.config_json = _json_safe(config)
    self.guard = str(train.transfer_guard)
    self.last: Dict[str, float] = {}

  def run(self, state, batches, checkpoint_data: bool, last_checkpoint: Optional[int]) -> Dict[str, float]:
    start = int(jax.device_get(state["step"]))
    if start >= self.num_steps:
      self.say(f"already trained to step {start} (config.train.num_steps={self.num_steps})", flush=True)
      return {}
    self.state, self.batches, self.last_checkpoint = state, batches, last_checkpoint
    # Saved with the checkpoint: the prefetcher reports the position after the
    # last batch a step consumed, not after the batches read ahead.
    self.data_for_checkpoint = batches if checkpoint_data else None
    first_batch = next(batches)
    compiled = self._compile(first_batch)
    self._open_outputs(start)
    try:
      with preemption.PreemptionWatcher() as watcher:
        for step in range(start + 1, self.num_steps + 1):
          self._step(compiled, step, first_batch if step == start + 1 else next(batches))
          first_batch = None
          self._after_step(step, start, watcher)
    finally:
      self._close_outputs()
    return self.last

  def _compile(self, first_batch):
    compiled, compile_s = self.setup.compile(self.state, first_batch)
    memory = memory_metrics(compiled)
    logging.info("train step compiled in %.1f s; %s", compile_s, memory_line(memory))
    self.say(f"train step compiled in {compile_s:.1f} s; {memory_line(memory)}", flush=True)
    self.first_record = {"compile_time_s": compile_s, **memory}
    return compiled

  def _open_outputs(self, start: int) -> None:
    self.writer = MetricWriter(self.workdir, self.is_main)
    self.progress = None
    if self.is_main:
      self.progress = tqdm(total=self.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    self.write = self.progress.write if self.progress is not None else self.say
    self.window = MetricWindow(start + 1)

  def _close_outputs(self) -> None:
    self.writer.close()
    if self.is_main and os.path.isfile(self.writer.path):
      write_learning_curves(self.workdir)
    if self.progress is not None:
      self.progress.close()

  def _step(self, compiled, step: int, batch) -> None:
    # The hot path: with train.transfer_guard="disallow" any implicit
    # transfer in it (a Python scalar argument, float() of a device
    # value on an accelerator) is an error; explicit puts and gets pass.
    with jax.transfer_guard(self.guard):
      self.state, metrics = compiled(self.state, self.setup.frozen, batch)
      self.window.add(step, metrics)
      # The window that ended at the previous step is fetched now, while this one runs.
      if self.window.flush_due is not None:
        self._flush(self.window.flush_due)

  def _after_step(self, step: int, start: int, watcher) -> None:
    """Logging, evaluation, checkpointing and stopping, as due after ``step``."""
    log_step = step % self.log_every == 0 or step == self.num_steps or step == start + 1
    # Every process asks at every step (multi-process agreement); the last step just ends.
    stopping = watcher.should_stop(step) and step < self.num_steps
    # A grace period is short: a preempted step saves and leaves, without its evaluation.
    evaluate_fn = None if stopping else self.evaluation_due(step)
    is_eval = evaluate_fn is not None
    best_metric = self.config.train.best_metric
    is_ckpt = step % self.ckpt_every == 0 or step == self.num_steps or (is_eval and bool(best_metric))
    if is_eval or is_ckpt or stopping or step == self.num_steps:
      self._flush(step)  # values are needed now, and nothing is saved after a non-finite step
    elif log_step:
      self.window.flush_due = step
    eval_metrics = self._evaluate(step, evaluate_fn) if is_eval else None
    if is_ckpt or stopping:
      self._save(step, eval_metrics, force=stopping)
    if stopping:
      self.checkpointer.wait()
      error = TrainingPreempted(watcher.signum, step, f"{self.checkpointer.directory}/{step}")
      logging.warning("%s", error)
      self.write(str(error))
      raise error

  def _flush(self, up_to: int) -> None:
    values, steps, seconds = self.window.fetch(up_to, self.last_checkpoint)
    if not steps:
      return
    step_time = seconds / steps
    last = dict(values)
    last["step_time_s"] = step_time
    last["samples_per_s"] = self.batch_size / step_time
    last["skipped_records"] = float(getattr(self.batches, "num_skipped", 0))
    if self.peak:
      last["mfu"] = self.flops_per_step / step_time / self.peak
    if self.first_record:
      last.update(self.first_record)
      self.first_record = {}
    self.last = last
    self.writer.write(up_to, last)
    if self.progress is not None:
      # The bar counts finished steps: counting dispatched ones would run ahead
      # of the devices and then stall at every fetch, with an ETA to match.
      self.progress.update(steps)
      self.progress.set_postfix(loss=f"{last['loss']:.4f}", samples_s=f"{last['samples_per_s']:.1f}")

  def _evaluate(self, step: int, evaluate_fn) -> Dict[str, float]:
    eval_metrics = evaluate_fn(self.setup.variables(self.state), os.path.join(self.workdir, "eval", f"step_{step}"))
    self.writer.write(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
    self.write(_eval_line(step, eval_metrics, self.config.train.best_metric))
    if self.is_main:
      write_learning_curves(self.workdir)
    self.window.restart_clock()
    return eval_metrics

  def _save(self, step: int, eval_metrics=None, force=False) -> None:
    self.checkpointer.save(
      step, self.state, self.data_for_checkpoint, self.config_json, metrics=eval_metrics, force=force
    )
    self.last_checkpoint = step
    logging.info("checkpoint step %d saving to %s/%d", step, self.checkpointer.directory, step)
    self.write(f"checkpoint step {step} -> {self.checkpointer.directory}/{step}")
    self.window.restart_clock()
