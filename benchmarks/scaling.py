r"""Train-step time and memory against batch size and (simulated) device count.

Three sweeps, each point in its own subprocess (the device count of the CPU
backend is fixed at start-up: XLA_FLAGS=--xla_force_host_platform_device_count):

* batch: one device, global batch B in --batches; step time and the compiled
  step's memory (arguments, outputs, temporaries from ``memory_analysis()``).
* devices: data parallel over N simulated devices in --devices, --per_device_batch
  studies each (weak scaling).  Simulated devices share this machine's cores,
  so step time shows overhead, not speed-up.
* fsdp: memory per device of the base model with FSDP over 2 and 8 devices
  (parameter ``embed`` dimensions and their optimizer state sharded over the
  'fsdp' mesh axis by ``config.sharding.rules``), from the compiled step only.

The training step is ``clinvla_jax.train.TrainSetup`` (the sharded, jitted step
of the training loop).

  python benchmarks/scaling.py --config=tiny --out=/tmp/scaling_tiny.json
  python benchmarks/scaling.py --config=base --batches=1,2,4,8 --devices=1,2,4,8 --per_device_batch=1 \
      --fsdp=2,8 --out=/tmp/scaling_base.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _worker(spec: dict) -> dict:
  """One measurement; runs in a fresh process with the device count already set."""
  sys.path.insert(0, _ROOT)
  from clinvla_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_host_runtime()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from benchmarks import vs_pytorch  # pylint: disable=g-import-not-at-top
  from clinvla_jax import api, train  # pylint: disable=g-import-not-at-top
  from clinvla_jax.data import records  # pylint: disable=g-import-not-at-top

  cfg = vs_pytorch.build_config(spec["config"])
  cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = spec["data"], spec["fsdp"], 1
  cfg.optim.batch_size = spec["batch"]
  setup = train.TrainSetup(cfg)
  mcfg = api.model_config(cfg)
  num_kept = records.num_kept_patches(float(cfg.data.mask_ratio), mcfg.image.num_patches)
  batch_np = vs_pytorch.synthetic_batch(mcfg, spec["batch"], num_kept)
  batch = {k: jax.device_put(jnp.asarray(v), setup.batch_shardings[k]) for k, v in batch_np.items()}
  with setup.context():
    t = time.perf_counter()
    step = setup._step  # pylint: disable=protected-access
    compiled = step.lower(setup.abstract_state, setup.frozen, batch).compile()
    compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  out = {
    **spec,
    "devices": jax.device_count(),
    "compile_s": compile_s,
    "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
  }
  for field in (
    "argument_size_in_bytes",
    "output_size_in_bytes",
    "temp_size_in_bytes",
    "alias_size_in_bytes",
    "generated_code_size_in_bytes",
  ):
    out[field] = int(getattr(mem, field, 0) or 0)
  # Per device: what the step holds at its peak (inputs + outputs not aliased to
  # donated inputs + temporaries).
  out["peak_bytes_per_device"] = (
    out["argument_size_in_bytes"] + out["output_size_in_bytes"] - out["alias_size_in_bytes"] + out["temp_size_in_bytes"]
  )
  params_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(setup.frozen))
  out["frozen_param_bytes_total"] = int(params_bytes)
  if spec["steps"]:
    state = setup.init_state()
    times = []
    with setup.context():
      for i in range(spec["steps"] + 1):
        t = time.perf_counter()
        state, metrics = compiled(state, setup.frozen, batch)
        jax.block_until_ready(metrics["loss"])
        if i:
          times.append(time.perf_counter() - t)
    out["step_s"] = float(np.median(times))
    out["step_times"] = times
    out["samples_per_s"] = spec["batch"] / out["step_s"]
  return out


def _run_point(spec: dict, devices: int) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(
    [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
    env=env,
    capture_output=True,
    text=True,
    check=False,
    cwd=_ROOT,
  )
  for line in proc.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT ") :])
  tail = (proc.stderr or "")[-2000:]
  return {**spec, "error": f"exit {proc.returncode}: {tail}"}


def _mib(n) -> str:
  return f"{n / 2**20:9.1f}"


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="tiny")
  parser.add_argument("--batches", default="1,2,4,8")
  parser.add_argument("--devices", default="1,2,4,8")
  parser.add_argument("--per_device_batch", type=int, default=2)
  parser.add_argument("--fsdp", default="2,8", help="FSDP device counts (memory only; base config)")
  parser.add_argument("--fsdp_batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--out", default=None)
  parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    print("RESULT " + json.dumps(_worker(json.loads(args.worker))), flush=True)
    return

  ints = lambda s: [int(x) for x in s.split(",") if x]
  results = {
    "config": args.config,
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "load_average_start": list(os.getloadavg()),
    "batch": [],
    "devices": [],
    "fsdp": [],
  }
  header = (
    f"{'points':>8} {'mesh':>22} {'batch':>5} {'step s':>8} {'samples/s':>9} {'args MiB':>9} "
    f"{'temp MiB':>9} {'peak MiB/dev':>12}"
  )

  def show(r):
    if "error" in r:
      print(f"   error: {r['error']}")
      return
    print(
      f"{r['devices']:>8} {json.dumps(r['mesh']):>22} {r['batch']:>5} {r.get('step_s', float('nan')):8.3f} "
      f"{r.get('samples_per_s', float('nan')):9.2f} {_mib(r['argument_size_in_bytes'])} "
      f"{_mib(r['temp_size_in_bytes'])} {_mib(r['peak_bytes_per_device']):>12}",
      flush=True,
    )

  print(f"== batch sweep, 1 device, {args.config}\n{header}")
  for b in ints(args.batches):
    r = _run_point({"config": args.config, "batch": b, "data": 1, "fsdp": 1, "steps": args.steps}, 1)
    results["batch"].append(r)
    show(r)
  print(
    f"== device sweep, data parallel, {args.per_device_batch} per device (simulated devices share the CPU)\n{header}"
  )
  for n in ints(args.devices):
    r = _run_point(
      {"config": args.config, "batch": n * args.per_device_batch, "data": n, "fsdp": 1, "steps": args.steps}, n
    )
    results["devices"].append(r)
    show(r)
  print(f"== FSDP memory per device, {args.config}, global batch {args.fsdp_batch} (compiled, not run)\n{header}")
  for n in ints(args.fsdp):
    for data, fsdp in ((n, 1), (1, n)):
      r = _run_point({"config": args.config, "batch": args.fsdp_batch, "data": data, "fsdp": fsdp, "steps": 0}, n)
      results["fsdp"].append(r)
      show(r)
  results["load_average_end"] = list(os.getloadavg())
  if args.out:
    sys.path.insert(0, _ROOT)
    from benchmarks import vs_pytorch  # pylint: disable=g-import-not-at-top

    vs_pytorch.write_json(args.out, results)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
