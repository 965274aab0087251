r"""ClinVLA in JAX against the same model in PyTorch (timm + transformers).

Builds both from the same initialised weights (``benchmarks/torch_clinvla.py``),
checks that they agree (embeddings and loss, fp32), then times in one process,
alternating JAX and PyTorch so that both see the same machine load:

* the train step: frozen backbones, adapters / norms / heads / embeddings
  trainable by ``config.optim.param_groups``, dropout as configured, global-norm
  clipping + AdamW on both sides (JAX: ``clinvla_jax.train.make_train_step``,
  jitted with the state donated);
* inference embedding: one frontal view with all 196 patches + the report,
  global embeddings of both towers.

With ``--dtype=bfloat16`` JAX runs under the precision policy ``--precision``
(default "auto": bf16 operands with float32 products on a CPU with bf16
hardware, bf16 on GPU/TPU; ``clinvla_jax.model.layers.POLICIES``) and is timed
against PyTorch bf16 autocast *and* PyTorch fp32 eager in the same alternating
loop; the JSON then also holds how far the policy's embeddings and loss are
from fp32 JAX (``bf16_vs_fp32_*``).

Medians after warm-up.  FLOPs per step come from XLA's cost analysis of the
compiled step and from ``clinvla_jax.model.flops`` (convention printed).

  python benchmarks/vs_pytorch.py --config=tiny --batch=8 --steps=5
  python benchmarks/vs_pytorch.py --config=base --batch=8 --steps=7 --out=/tmp/vs_pytorch_base.json
  python benchmarks/vs_pytorch.py --config=base --batch=8 --steps=5 --dtype=bfloat16 --out=/tmp/vs_pytorch_bf16.json
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clinvla_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_host_runtime()

import dataclasses
import functools
import json
import platform
import statistics
import time
from typing import Any, Callable, Dict, List, Optional

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from clinvla_jax import api
from clinvla_jax import losses
from clinvla_jax import optim as optim_lib
from clinvla_jax.config import load_config
from clinvla_jax.model import flops as flops_lib
from clinvla_jax.model.clinvla import ClinVLA, matmul_ready_params

_CONFIG = flags.DEFINE_string("config", "tiny", "tiny | base | a path to a config file.")
_BATCH = flags.DEFINE_integer("batch", 8, "Studies per step.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per framework and pass (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps per framework and pass.")
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")
_DTYPE = flags.DEFINE_enum(
  "dtype",
  "float32",
  ["float32", "bfloat16"],
  "Compute dtype for the timed runs (the agreement check is always fp32). "
  "bfloat16: JAX under --precision, PyTorch under bf16 autocast and in fp32.",
)
_PRECISION = flags.DEFINE_string("precision", "auto", "JAX precision policy with --dtype=bfloat16 (model.precision).")
_ATTENTION = flags.DEFINE_string(
  "attention_impl", None, "model.{image,text}.attention_impl for the timed runs (default: config)."
)
_DROPOUT = flags.DEFINE_boolean("dropout", True, "Train with the config's dropout rates (False: none).")
_SKIP_TORCH = flags.DEFINE_boolean("skip_torch", False, "Time JAX only (no agreement check).")
_TORCH_DEVICE = flags.DEFINE_string("torch_device", "auto", "auto | cpu | cuda.")
_TOL = flags.DEFINE_float("tolerance", 1e-4, "Largest allowed |JAX - PyTorch| in the fp32 check.")
_PARTS = flags.DEFINE_list("parts", ["train", "embed"], "What to time: train, embed.")
_CHECK_BATCH = flags.DEFINE_integer("check_batch", 4, "Studies in the fp32 agreement check.")
_EMBED_BATCH = flags.DEFINE_integer(
  "embed_batch", 0, "Studies per embedding call (0: --batch); 1 gives the latency of one study."
)

_T0 = time.perf_counter()


def log(msg: str) -> None:
  # Progress with elapsed time: on an accelerator the compiles dominate the run.
  print(f"[{time.perf_counter() - _T0:7.1f} s] {msg}", flush=True)


MODEL_INPUTS = ("patches", "patch_idx", "view_valid", "input_ids", "attention_mask")


def _config_path(name: str) -> str:
  if os.path.exists(name):
    return name
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  return os.path.join(root, "configs", f"{name}.py")


def build_config(
  name: str, *, dtype: str = "float32", attention_impl=None, dropout: bool = True, precision: str = "auto"
):
  """The benchmark's config: fp32 exactly, or ``precision`` (a policy) when dtype is bfloat16."""
  overrides = {
    # Non-zero adapters, so that the agreement check exercises them.
    "model.image.adapter_init": "bert",
    "model.text.adapter_init": "bert",
    "model.precision": precision if dtype == "bfloat16" else "float32",
  }
  if not dropout:
    overrides.update({"model.text.dropout": 0.0, "model.text.attention_dropout": 0.0})
  cfg = load_config(_config_path(name), overrides)
  if attention_impl is not None:
    cfg.model.image.attention_impl = attention_impl
    cfg.model.text.attention_impl = attention_impl
  return cfg


def synthetic_batch(mcfg, batch: int, num_kept: int, seed: int = 0, views: int = 4) -> Dict[str, np.ndarray]:
  """Grayscale uint8 patches like the pipeline's, some missing views, reports of mixed length."""
  rng = np.random.RandomState(seed)
  grid = mcfg.image.num_patches
  patch_dim = mcfg.image.patch_size**2
  idx = np.stack(
    [np.stack([np.sort(rng.permutation(grid)[:num_kept]) for _ in range(views)]) for _ in range(batch)]
  ).astype(np.int32)
  valid = rng.rand(batch, views) < 0.75
  valid[:, 0] = True
  length = mcfg.text.max_len
  lengths = rng.randint(length // 4, length + 1, size=batch)
  mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int32)
  ids = rng.randint(1000, mcfg.text.vocab_size, size=(batch, length)) * mask
  ids[:, 0] = 101
  return {
    "patches": rng.randint(0, 256, size=(batch, views, num_kept, patch_dim)).astype(np.uint8),
    "patch_idx": idx,
    "view_valid": valid,
    "input_ids": ids.astype(np.int32),
    "attention_mask": mask,
  }


def machine_description() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  dev = jax.devices()[0]
  desc = f"{model}, {os.cpu_count()} CPUs, jax {jax.__version__} on {dev.platform} ({dev.device_kind})"
  try:
    import torch  # pylint: disable=g-import-not-at-top

    desc += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
  except ImportError:
    pass
  return desc


def median(xs: List[float]) -> float:
  return float(statistics.median(xs)) if xs else float("nan")


def _cost_flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


# ---------------------------------------------------------------- JAX side


def jax_train_runner(step, state, batch_np) -> Callable[[], None]:
  """A no-argument callable that runs one donated train step on a fixed batch and waits for it."""
  jbatch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  holder = {"state": state}  # the step donates its input state, so each call must use the newest one

  def run():
    holder["state"], loss = step(holder["state"], jbatch)
    loss.block_until_ready()

  return run


def make_jax_train(cfg, params, batch_np, num_steps: int = 1000, compiler_options: Optional[Dict] = None):
  """(step(state, batch) -> (state, loss), initial state, compiled, compile seconds).

  compiler_options: XLA debug options for this compilation only (e.g.
  ``{"xla_cpu_use_xnnpack": True}``), so that variants can be compared in one process.
  """
  from clinvla_jax.train import make_train_step  # pylint: disable=g-import-not-at-top

  model = api.build_model(cfg)
  rules = list(cfg.optim.param_groups)
  trainable, frozen = optim_lib.split_params(params, rules)
  frozen = matmul_ready_params(frozen, api.model_config(cfg))  # as train.TrainSetup does
  # The step donates its state: train on a copy so that `params` stays usable.
  trainable = jax.tree_util.tree_map(jnp.copy, trainable)
  tx, _ = optim_lib.make_optimizer(cfg.optim, trainable, rules, num_steps)
  step_fn = make_train_step(cfg, model, tx)
  state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}
  jitted = jax.jit(step_fn, donate_argnums=(0,))
  batch = {k: jnp.asarray(v) for k, v in batch_np.items()}
  t = time.perf_counter()
  compiled = jitted.lower(state, frozen, batch).compile(compiler_options=compiler_options)
  compile_s = time.perf_counter() - t

  def step(state, batch):
    state, metrics = compiled(state, frozen, batch)
    return state, metrics["loss"]

  return step, state, compiled, compile_s


def make_jax_embed(cfg, variables, batch_np, compiler_options: Optional[Dict] = None):
  model = api.build_model(cfg)
  variables = matmul_ready_params(variables, api.model_config(cfg))  # as evaluate.embed does

  def embed(variables, patches, patch_idx, view_valid, input_ids, attention_mask):
    image = model.apply(variables, patches, patch_idx, view_valid, (0,), method=ClinVLA.encode_image)
    text = model.apply(variables, input_ids, attention_mask, method=ClinVLA.encode_text)
    return image["global"], text["global"]

  args = [jnp.asarray(batch_np[k]) for k in MODEL_INPUTS]
  compiled = jax.jit(embed).lower(variables, *args).compile(compiler_options=compiler_options)

  def run():
    out = compiled(variables, *args)
    jax.block_until_ready(out)
    return out

  return run, compiled


# ---------------------------------------------------------------- PyTorch side


def make_torch(cfg, host_params, device, dtype):
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_clinvla  # pylint: disable=g-import-not-at-top

  mcfg = api.model_config(cfg)
  model, groups = torch_clinvla.from_jax(mcfg, host_params, list(cfg.optim.param_groups))
  model.to(device)
  opt = torch_clinvla.make_optimizer(model, groups, cfg.optim.learning_rates, float(cfg.optim.weight_decay))
  trainable = [p for p in model.parameters() if p.requires_grad]
  autocast = (
    torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if dtype == "bfloat16"
    else torch.autocast(device_type=device.type, enabled=False)
  )

  def sync():
    if device.type == "cuda":
      torch.cuda.synchronize()

  def train_step(batch):
    model.train()
    with autocast:
      out = model(*(batch[k] for k in MODEL_INPUTS))
    loss = torch_clinvla.clinvla_loss(out, cfg.loss)
    loss.backward()
    if cfg.optim.grad_clip_norm:
      torch.nn.utils.clip_grad_norm_(trainable, float(cfg.optim.grad_clip_norm))
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync()
    return loss

  def embed(batch):
    model.eval()
    with torch.inference_mode(), autocast:
      image = model.encode_image(batch["patches"], batch["patch_idx"], batch["view_valid"], (0,), with_local=False)
      text = model.encode_text(batch["input_ids"], batch["attention_mask"], with_local=False)
    sync()
    return image["global"], text["global"]

  return model, train_step, embed


def precision_agreement(cfg, cfg32, params, batch_np) -> Dict[str, float]:
  """How far JAX under ``cfg``'s precision policy is from JAX in fp32 (global embeddings and loss)."""
  from clinvla_jax.model import layers  # pylint: disable=g-import-not-at-top

  out = {}
  for name, c in (("policy", cfg), ("fp32", cfg32)):
    model = api.build_model(c)
    # The fp32 reference at full precision (GPUs would otherwise use TF32); the policy as it runs.
    with jax.default_matmul_precision("highest" if name == "fp32" else None):
      o = jax.jit(lambda v, *a, m=model: m.apply(v, *a))({"params": params}, *(batch_np[k] for k in MODEL_INPUTS))
      loss, _ = losses.clinvla_loss(o, c.loss)
    out[name] = ({t: np.asarray(o[t]["global"], np.float32) for t in ("image", "text")}, float(loss))
  (emb, loss), (emb32, loss32) = out["policy"], out["fp32"]
  diffs = [float(np.max(np.abs(emb[t] - emb32[t]))) for t in emb] + [abs(loss - loss32)]
  cosines = [
    np.sum(emb[t] * emb32[t], -1) / (np.linalg.norm(emb[t], axis=-1) * np.linalg.norm(emb32[t], axis=-1)) for t in emb
  ]
  mcfg = api.model_config(cfg)
  return {
    "bf16_vs_fp32_max_abs_diff": max(diffs),
    "bf16_vs_fp32_min_cosine": float(min(c.min() for c in cosines)),
    "bf16_vs_fp32_min_cosine_image": float(cosines[0].min()),
    "bf16_vs_fp32_min_cosine_text": float(cosines[1].min()),
    "bf16_vs_fp32_loss_abs_diff": abs(loss - loss32),
    "precision": layers.tower_precision(mcfg.image).describe(),
  }


def agreement(cfg32, params, host_params, batch_np, device) -> Dict[str, float]:
  """Max |JAX - PyTorch| of embeddings and loss, fp32, no dropout."""
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_clinvla  # pylint: disable=g-import-not-at-top

  model_j = api.build_model(cfg32)
  # GPUs run fp32 matmuls at reduced (TF32-like) precision unless told otherwise.
  with jax.default_matmul_precision("highest"):
    out_j = jax.jit(lambda v, *a: model_j.apply(v, *a))({"params": params}, *(batch_np[k] for k in MODEL_INPUTS))
    loss_j, _ = losses.clinvla_loss(out_j, cfg32.loss)
  model_t, _ = torch_clinvla.from_jax(api.model_config(cfg32), host_params, list(cfg32.optim.param_groups))
  model_t.to(device).eval()
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  tb = {k: v.to(device) for k, v in torch_clinvla.to_torch_batch(batch_np).items()}
  with torch.no_grad():
    out_t = model_t(*(tb[k] for k in MODEL_INPUTS))
    loss_t = torch_clinvla.clinvla_loss(out_t, cfg32.loss)
  diffs = {}
  for tower in ("image", "text"):
    for key in ("global", "local", "hidden"):
      a = np.asarray(out_j[tower][key], np.float32)
      b = out_t[tower][key].float().cpu().numpy()
      diffs[f"{tower}_{key}"] = float(np.max(np.abs(a - b)))
  diffs["loss"] = abs(float(loss_j) - float(loss_t))
  diffs["loss_jax"] = float(loss_j)
  diffs["loss_torch"] = float(loss_t)
  return diffs


# ---------------------------------------------------------------- main


def time_alternating(fns: Dict[str, Callable[[], None]], warmup: int, steps: int) -> Dict[str, List[float]]:
  times = {k: [] for k in fns}
  for i in range(warmup + steps):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      dt = time.perf_counter() - t
      if i >= warmup:
        times[name].append(dt)
  return times


def _time_and_record(result: Dict, part: str, fns: Dict[str, Callable[[], None]], warmup: int, steps: int) -> None:
  """Times ``fns`` alternately; stores ``{part}_s_{name}`` (median), ``{part}_times_{name}`` and
  ``{part}_ratio`` (JAX time / PyTorch time)."""
  times = time_alternating(fns, warmup, steps)
  for name, ts in times.items():
    result[f"{part}_s_{name}"] = median(ts)
    result[f"{part}_times_{name}"] = ts
  if "torch" in times:
    result[f"{part}_ratio"] = result[f"{part}_s_jax"] / result[f"{part}_s_torch"]
  if "torch_fp32" in times:
    # A 16-bit run: "torch" is PyTorch under bf16 autocast; fp32 eager is the baseline.
    result[f"{part}_s_torch_bf16"] = result[f"{part}_s_torch"]
    result[f"{part}_ratio_vs_torch_fp32"] = result[f"{part}_s_jax"] / result[f"{part}_s_torch_fp32"]
    result[f"{part}_ratio_vs_torch_bf16"] = result[f"{part}_ratio"]


@dataclasses.dataclass(frozen=True)
class _Setup:
  """What every phase of ``run`` shares: both configs, the initial weights and the synthetic batches."""

  cfg: Any
  cfg32: Any
  mcfg: Any
  params: Any
  host_params: Any
  num_kept: int
  train_np: Dict[str, np.ndarray]
  embed_np: Dict[str, np.ndarray]
  dtype: str


def _prepare(
  config: str, batch: int, embed_batch: int, dtype: str, attention_impl, dropout: bool, precision: str
) -> _Setup:
  from clinvla_jax.data import records  # pylint: disable=g-import-not-at-top

  cfg = build_config(config, dtype=dtype, attention_impl=attention_impl, dropout=dropout, precision=precision)
  cfg32 = build_config(config, dtype="float32", attention_impl=None, dropout=dropout)
  mcfg = api.model_config(cfg)
  num_kept = records.num_kept_patches(float(cfg.data.mask_ratio), mcfg.image.num_patches)
  train_np = synthetic_batch(mcfg, batch, num_kept, seed=0)
  embed_np = synthetic_batch(mcfg, embed_batch, mcfg.image.num_patches, seed=1, views=1)
  embed_np["view_valid"][:] = True
  log(f"{jax.devices()[0].device_kind}: initialising {config}")
  params = api.init_params(cfg32, jax.random.key(0))["params"]
  return _Setup(cfg, cfg32, mcfg, params, jax.device_get(params), num_kept, train_np, embed_np, dtype)


def _describe_run(
  config: str, batch: int, embed_batch: int, dtype: str, steps: int, warmup: int, dropout: bool
) -> Dict:
  """The result's header: what was run, where, and under which machine load and runtime settings."""
  result = {
    "config": config,
    "batch": batch,
    "embed_batch": embed_batch,
    "machine": machine_description(),
    "dtype": dtype,
    "device_kind": jax.devices()[0].device_kind,
    "steps": steps,
    "warmup": warmup,
    "dropout": dropout,
    "load_average_start": list(os.getloadavg()),
  }
  try:
    from clinvla_jax import runtime  # pylint: disable=g-import-not-at-top

    result["tcmalloc"] = runtime.tcmalloc_loaded()
  except ImportError:
    pass
  result["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  return result


def _torch_device(torch_device: str):
  import torch  # pylint: disable=g-import-not-at-top

  if torch_device == "auto":
    torch_device = "cuda" if (jax.devices()[0].platform == "gpu" and torch.cuda.is_available()) else "cpu"
  return torch.device(torch_device)


def _check_agreement(result: Dict, s: _Setup, device, check_batch: int, tolerance: float) -> None:
  log("fp32 agreement check")
  check_np = synthetic_batch(s.mcfg, check_batch, s.num_kept, seed=2)
  diffs = agreement(s.cfg32, s.params, s.host_params, check_np, device)
  result["agreement"] = diffs
  result["max_abs_diff"] = max(v for k, v in diffs.items() if not k.startswith("loss_"))
  print("agreement (fp32, max |JAX - PyTorch|): " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()), flush=True)
  if result["max_abs_diff"] > tolerance:
    raise SystemExit(f"JAX and PyTorch disagree: {result['max_abs_diff']:.3g} > {tolerance}")


def _check_precision(result: Dict, s: _Setup, check_batch: int) -> None:
  log("policy vs fp32 check")
  result.update(precision_agreement(s.cfg, s.cfg32, s.params, synthetic_batch(s.mcfg, check_batch, s.num_kept, seed=2)))
  embed_check = precision_agreement(s.cfg, s.cfg32, s.params, s.embed_np)
  result["bf16_vs_fp32_min_cosine_embed_batch"] = embed_check["bf16_vs_fp32_min_cosine"]
  print(
    f"{result['precision']} vs fp32: max |diff| {result['bf16_vs_fp32_max_abs_diff']:.3g}, min cosine "
    f"{result['bf16_vs_fp32_min_cosine']:.6f} (embedding batch {embed_check['bf16_vs_fp32_min_cosine']:.6f})",
    flush=True,
  )


def _record_flops(result: Dict, s: _Setup, batch: int, embed_batch: int) -> None:
  """Analytic FLOPs of both timed programs and the peak rate that MFU divides by."""
  per_study_train = flops_lib.train_step_flops_per_study(s.mcfg, kept_patches=s.num_kept)
  peak = _peak_flops(jax.devices()[0], s.dtype)
  result.update(
    {
      "analytic_flops_train_step": per_study_train * batch,
      "analytic_flops_embed": flops_lib.eval_forward_flops(s.mcfg)["total"] * embed_batch,
      "peak_flops": peak["value"],
      "peak_source": peak["source"],
    }
  )
  print(
    "FLOP conventions: analytic = 2 per multiply-accumulate, matmuls only (projections, MLPs, adapters, "
    "heads, QK^T, AV), train step = 2x forward (frozen backbone: activation gradients only); "
    "XLA = cost_analysis()['flops'] of the compiled program (2 per MAC for dots plus 1 per "
    "element-wise op, per device).",
    flush=True,
  )


def _torch_runners(s: _Setup, device, batch_np, part: str) -> Dict[str, Callable[[], None]]:
  """PyTorch's ``part`` ("train" or "embed") on a fixed batch: "torch" in the run's dtype, plus "torch_fp32"
  (fp32 eager, the baseline) for a 16-bit run."""
  tbatch = {k: v.to(device) for k, v in _torch_batch(batch_np).items()}
  variants = [("torch", s.cfg, s.dtype)]
  if s.dtype != "float32":
    variants.append(("torch_fp32", s.cfg32, "float32"))
  fns = {}
  for name, cfg, dtype in variants:
    _, train_step, embed = make_torch(cfg, s.host_params, device, dtype)
    fns[name] = functools.partial(train_step if part == "train" else embed, tbatch)
  return fns


def _time_train(result: Dict, s: _Setup, device, warmup: int, steps: int) -> None:
  log("compiling the JAX train step")
  step, state, compiled, compile_s = make_jax_train(s.cfg, s.params, s.train_np)
  xla_train = _cost_flops(compiled)
  result.update({"xla_flops_train_step": xla_train, "compile_s_jax": compile_s})
  # Local, so that the train state held by the runner is dropped before the embedding phase.
  fns = {"jax": jax_train_runner(step, state, s.train_np)}
  if device is not None:
    log("building the PyTorch model")
    fns.update(_torch_runners(s, device, s.train_np, "train"))
  log("timing train steps")
  _time_and_record(result, "train_step", fns, warmup, steps)
  peak = result["peak_flops"]
  for name, fl in (("xla", xla_train), ("analytic", result["analytic_flops_train_step"])):
    result[f"train_flops_per_s_{name}"] = fl / result["train_step_s_jax"]
    result[f"train_mfu_{name}"] = fl / result["train_step_s_jax"] / peak if peak else None


def _time_embed(result: Dict, s: _Setup, device, warmup: int, steps: int, embed_batch: int) -> None:
  variables = {"params": s.params}  # fp32 parameters; the model casts at use
  log("compiling the JAX embedding")
  jax_embed, compiled_e = make_jax_embed(s.cfg, variables, s.embed_np)
  result["xla_flops_embed"] = _cost_flops(compiled_e)
  fns = {"jax": jax_embed}
  if device is not None:
    fns.update(_torch_runners(s, device, s.embed_np, "embed"))
  log("timing embedding")
  _time_and_record(result, "embed", fns, warmup, steps)
  for name in ("jax", "torch"):
    if f"embed_s_{name}" in result:
      result[f"embed_ms_per_study_{name}"] = 1e3 * result[f"embed_s_{name}"] / embed_batch
  peak = result["peak_flops"]
  result["embed_mfu_analytic"] = result["analytic_flops_embed"] / result["embed_s_jax"] / peak if peak else None


def run(
  config: str,
  batch: int,
  steps: int,
  warmup: int = 2,
  dtype: str = "float32",
  attention_impl=None,
  dropout: bool = True,
  skip_torch: bool = False,
  torch_device: str = "auto",
  tolerance: float = 1e-4,
  parts=("train", "embed"),
  check_batch: int = 4,
  embed_batch: int = 0,
  on_progress: Callable[[Dict], None] = lambda result: None,
  precision: str = "auto",
) -> Dict:
  """Runs the comparison; ``on_progress(result)`` is called after each phase with what is known so far."""
  embed_batch = embed_batch or batch
  s = _prepare(config, batch, embed_batch, dtype, attention_impl, dropout, precision)
  result = _describe_run(config, batch, embed_batch, dtype, steps, warmup, dropout)
  device = None if skip_torch else _torch_device(torch_device)  # None: JAX only
  if device is None:
    result["max_abs_diff"] = None
  else:
    _check_agreement(result, s, device, check_batch, tolerance)
  if dtype == "bfloat16":
    _check_precision(result, s, check_batch)
  on_progress(result)

  _record_flops(result, s, batch, embed_batch)
  if "train" in parts:
    _time_train(result, s, device, warmup, steps)
    on_progress(result)
  if "embed" in parts:
    _time_embed(result, s, device, warmup, steps, embed_batch)
  result["load_average_end"] = list(os.getloadavg())
  return result


def _torch_batch(batch_np):
  from benchmarks import torch_clinvla  # pylint: disable=g-import-not-at-top

  return torch_clinvla.to_torch_batch(batch_np)


def _peak_flops(dev, dtype: str) -> Dict:
  kind = dev.device_kind.lower()
  for name, value in (("a100", 312e12), ("h100", 989e12), ("h200", 989e12)):
    if name in kind:
      return {"value": value, "source": f"{name.upper()} dense bf16 spec"}
  if dev.platform == "cpu":
    size = 2048
    # The fastest product of the dtype: bf16 operands with float32 results on bf16 hardware.
    operand = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jnp.asarray(np.random.RandomState(0).rand(size, size), operand)
    f = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32)).lower(a, a).compile()
    f(a, a).block_until_ready()
    times = []
    for _ in range(7):
      t = time.perf_counter()
      f(a, a).block_until_ready()
      times.append(time.perf_counter() - t)
    rate = 2 * size**3 / median(times)
    kind_name = "bf16 x bf16 -> fp32" if operand == jnp.bfloat16 else "fp32"
    return {"value": rate, "source": f"measured {kind_name} {size}x{size} matmul in this run"}
  return {"value": 0.0, "source": "unknown device"}


def print_summary(r: Dict) -> None:
  b = r["batch"]
  print(f"\n== ClinVLA {r['config']}, batch {b}, {r.get('precision', r['dtype'])}, {r['machine']}")
  print(
    f"   load average start {r['load_average_start']}, end {r.get('load_average_end')}; "
    f"tcmalloc {r.get('tcmalloc')}; XLA_FLAGS '{r.get('xla_flags', '')}'"
  )
  if r.get("max_abs_diff") is not None:
    print(f"   max |JAX - PyTorch| (fp32 embeddings, loss): {r['max_abs_diff']:.3g}")
  print(f"   peak for MFU: {r['peak_flops'] / 1e12:.3f} TFLOP/s ({r['peak_source']})")
  if "train_step_s_jax" in r:
    print(f"   train step   JAX {r['train_step_s_jax']:.4f} s ({b / r['train_step_s_jax']:.2f} samples/s)", end="")
    if "train_step_s_torch" in r:
      print(
        f" | PyTorch {r['train_step_s_torch']:.4f} s ({b / r['train_step_s_torch']:.2f} samples/s) | "
        f"JAX/PyTorch time {r['train_step_ratio']:.3f}",
        end="",
      )
    if "train_step_s_torch_fp32" in r:
      print(
        f" | PyTorch fp32 {r['train_step_s_torch_fp32']:.4f} s | JAX/PyTorch-fp32 time "
        f"{r['train_step_ratio_vs_torch_fp32']:.3f}",
        end="",
      )
    print()
    print(
      f"   train FLOPs/step: XLA {r['xla_flops_train_step'] / 1e9:.2f} GFLOP, analytic "
      f"{r['analytic_flops_train_step'] / 1e9:.2f} GFLOP; achieved "
      f"{r['train_flops_per_s_xla'] / 1e9:.1f} / {r['train_flops_per_s_analytic'] / 1e9:.1f} GFLOP/s; "
      f"MFU {100 * (r['train_mfu_xla'] or 0):.1f} % (XLA count) / {100 * (r['train_mfu_analytic'] or 0):.1f} % "
      f"(analytic)"
    )
  if "embed_s_jax" in r:
    b = r.get("embed_batch") or b
    print(
      f"   embed (batch {b}) JAX {r['embed_s_jax']:.4f} s ({b / r['embed_s_jax']:.2f} samples/s, "
      f"{r['embed_ms_per_study_jax']:.2f} ms/study)",
      end="",
    )
    if "embed_s_torch" in r:
      print(
        f" | PyTorch {r['embed_s_torch']:.4f} s ({b / r['embed_s_torch']:.2f} samples/s) | "
        f"JAX/PyTorch time {r['embed_ratio']:.3f}",
        end="",
      )
    if "embed_s_torch_fp32" in r:
      print(
        f" | PyTorch fp32 {r['embed_s_torch_fp32']:.4f} s | JAX/PyTorch-fp32 time {r['embed_ratio_vs_torch_fp32']:.3f}",
        end="",
      )
    print()


def write_json(path: str, result: Dict) -> None:
  """Writes ``result`` to ``path`` atomically (a reader never sees half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1)
  os.replace(tmp, path)


def main(argv):
  del argv
  # Written after every phase: a run stopped by a time limit keeps what it measured.
  on_progress = (lambda r: write_json(_OUT.value, dict(r, complete=False))) if _OUT.value else (lambda r: None)
  result = run(
    _CONFIG.value,
    _BATCH.value,
    _STEPS.value,
    _WARMUP.value,
    _DTYPE.value,
    _ATTENTION.value,
    _DROPOUT.value,
    _SKIP_TORCH.value,
    _TORCH_DEVICE.value,
    _TOL.value,
    tuple(_PARTS.value),
    _CHECK_BATCH.value,
    _EMBED_BATCH.value,
    on_progress,
    _PRECISION.value,
  )
  print_summary(result)
  if _OUT.value:
    write_json(_OUT.value, dict(result, complete=True))
    print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
