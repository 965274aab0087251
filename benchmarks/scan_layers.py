r"""The train step with the towers' blocks in a Python loop against one ``nn.scan`` over stacked blocks.

``model.{image,text}.scan_layers`` changes how the step is traced and compiled,
not what it computes: both layouts run here from the same weights (the scan
layout's are ``convert.stack_layers`` of the loop layout's) on the same batch.
Per layout: the time to trace + lower the step, the time XLA takes to compile
it, the compiled module's size, XLA's memory accounting, and the median step
time.  Compilations alternate between the layouts (``--compile_rounds``), and
so do the timed steps, so that both see the same machine load.

The train step is ``benchmarks/vs_pytorch.py``'s (``make_train_step`` with
frozen backbones, AdamW on the trainable tree, the state donated), under the
config's precision policy and the CPU's residual gradient barrier.

  python benchmarks/scan_layers.py --config=tiny --batch=4 --steps=3
  python benchmarks/scan_layers.py --config=base --batch=8 --steps=3 --out=/tmp/scan_layers_base.json
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clinvla_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_host_runtime()

import json
import statistics
import time
from typing import Dict

import argparse

import jax
import jax.numpy as jnp

from clinvla_jax import api, convert
from clinvla_jax import optim as optim_lib
from clinvla_jax.data import records
from clinvla_jax.model.clinvla import matmul_ready_params

LAYOUTS = ("loop", "scan")


def build_configs(name: str, precision: str):
  from benchmarks import vs_pytorch  # pylint: disable=g-import-not-at-top

  configs = {}
  for layout in LAYOUTS:
    cfg = vs_pytorch.build_config(name, dtype="float32" if precision == "float32" else "bfloat16", precision=precision)
    cfg.model.image.scan_layers = cfg.model.text.scan_layers = layout == "scan"
    configs[layout] = cfg
  return configs


def compile_train_step(cfg, params, batch):
  """(run: state -> state, initial state, {lower_s, compile_s, hlo_chars, memory/...}) for one layout."""
  from clinvla_jax.train import make_train_step, memory_metrics  # pylint: disable=g-import-not-at-top

  model = api.build_model(cfg)
  rules = list(cfg.optim.param_groups)
  trainable, frozen = optim_lib.split_params(params, rules)
  frozen = matmul_ready_params(frozen, api.model_config(cfg))
  trainable = jax.tree_util.tree_map(jnp.copy, trainable)
  tx, _ = optim_lib.make_optimizer(cfg.optim, trainable, rules, 1000)
  state = {"step": jnp.zeros((), jnp.int32), "params": trainable, "opt_state": tx.init(trainable)}
  jitted = jax.jit(make_train_step(cfg, model, tx), donate_argnums=(0,))
  start = time.perf_counter()
  lowered = jitted.lower(state, frozen, batch)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  compiled_at = time.perf_counter()
  info = {
    "lower_s": lowered_at - start,
    "compile_s": compiled_at - lowered_at,
    "total_compile_s": compiled_at - start,
    "hlo_chars": len(compiled.as_text()),
    **memory_metrics(compiled),
  }

  def run(state):
    state, metrics = compiled(state, frozen, batch)
    metrics["loss"].block_until_ready()
    return state, float(metrics["loss"])

  return run, state, info


def measure(config: str, batch_size: int, steps: int, warmup: int, compile_rounds: int, precision: str) -> Dict:
  from benchmarks import vs_pytorch  # pylint: disable=g-import-not-at-top

  configs = build_configs(config, precision)
  mcfg = api.model_config(configs["loop"])
  num_kept = records.num_kept_patches(float(configs["loop"].data.mask_ratio), mcfg.image.num_patches)
  loop_params = api.init_params(configs["loop"], jax.random.key(0))["params"]
  params = {"loop": loop_params, "scan": convert.stack_layers(loop_params)}
  batch = {k: jnp.asarray(v) for k, v in vs_pytorch.synthetic_batch(mcfg, batch_size, num_kept, seed=0).items()}

  result: Dict = {
    "config": config,
    "batch": batch_size,
    "precision": api.model_config(configs["loop"]).image.precision,
    "residual_grad_barrier": api.model_config(configs["loop"]).image.residual_grad_barrier,
    "machine": vs_pytorch.machine_description(),
    "load_average_start": os.getloadavg(),
  }
  compiles = {layout: [] for layout in LAYOUTS}
  runners = {}
  for r in range(compile_rounds):
    for layout in LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]:
      run, state, info = compile_train_step(configs[layout], params[layout], batch)
      compiles[layout].append(info)
      runners[layout] = [run, state]
      print(f"{layout}: lower {info['lower_s']:.1f} s, compile {info['compile_s']:.1f} s", flush=True)

  losses = {layout: [] for layout in LAYOUTS}
  times = {layout: [] for layout in LAYOUTS}
  for i in range(warmup + steps):
    for layout in LAYOUTS if i % 2 == 0 else LAYOUTS[::-1]:
      run, state = runners[layout]
      start = time.perf_counter()
      state, loss = run(state)
      seconds = time.perf_counter() - start
      runners[layout][1] = state
      losses[layout].append(loss)
      if i >= warmup:
        times[layout].append(seconds)
  for layout in LAYOUTS:
    first = compiles[layout][0]
    result[layout] = {
      "lower_s": statistics.median(c["lower_s"] for c in compiles[layout]),
      "compile_s": statistics.median(c["compile_s"] for c in compiles[layout]),
      "total_compile_s": statistics.median(c["total_compile_s"] for c in compiles[layout]),
      "step_s": statistics.median(times[layout]),
      "step_times_s": times[layout],
      "losses": losses[layout],
      **{k: v for k, v in first.items() if k.startswith("memory/") or k == "hlo_chars"},
    }
  loop, scan = result["loop"], result["scan"]
  result["ratios_scan_over_loop"] = {
    k: scan[k] / loop[k] for k in ("lower_s", "compile_s", "total_compile_s", "step_s", "hlo_chars") if loop[k]
  }
  if "memory/temp" in loop and loop["memory/temp"]:
    result["ratios_scan_over_loop"]["memory/temp"] = scan["memory/temp"] / loop["memory/temp"]
  result["load_average_end"] = os.getloadavg()
  return result


def main():
  # argparse, not absl flags: benchmarks/vs_pytorch.py (imported for its train setup) defines the same flag names.
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="base", help="tiny | base | a path to a config file.")
  parser.add_argument("--batch", type=int, default=8, help="Studies per step.")
  parser.add_argument("--steps", type=int, default=3, help="Timed steps per layout.")
  parser.add_argument("--warmup", type=int, default=1, help="Untimed steps per layout after compilation.")
  parser.add_argument("--compile_rounds", type=int, default=1, help="Compilations per layout (alternating).")
  parser.add_argument("--precision", default="auto", help="model.precision: a layers.POLICIES name or 'auto'.")
  parser.add_argument("--out", default="", help="Write the JSON result here as well.")
  args = parser.parse_args()
  result = measure(args.config, args.batch, args.steps, args.warmup, args.compile_rounds, args.precision)
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
