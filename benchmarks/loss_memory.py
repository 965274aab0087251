r"""Compiled memory per device of the contrastive losses and their gradients, dense against sharded.

For each global batch in --batches, on N simulated CPU devices (a data-parallel
mesh), the loss and its gradient with respect to the features and the loss
parameters are lowered and compiled, never run, and XLA's
``memory_analysis()`` gives the bytes per device:

* dense   - the global-batch expression (``batch_axes=()``) under ``jax.jit``
            with batch-sharded inputs, partitioned by XLA;
* sharded - the same call inside ``jax.set_mesh``, where the losses pick their
            ``shard_map`` ring form from the mesh.

Shapes come from the config (default ``configs/base.py``): local features of
``len(view_slots) x kept patches`` regions (196 in base) and ``text.max_len``
words (128), ``proj_dim`` channels (128); global embeddings of ``proj_dim``.
Parts: ``local`` (GLoRIA), ``infonce`` and ``sigmoid`` (global).

  python benchmarks/loss_memory.py --devices=8 --batches=64,128,256,512 --out=/tmp/loss_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List, Sequence

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("local", "infonce", "sigmoid")
IMPLS = ("dense", "sharded")


def _set_device_count(devices: int) -> None:
  """Simulated CPU devices; only possible before JAX starts its backend."""
  if "jax" in sys.modules:
    import jax  # pylint: disable=g-import-not-at-top

    if jax.device_count() < devices:
      raise RuntimeError(
        f"JAX already started with {jax.device_count()} devices, {devices} asked for: "
        "run this script in a fresh process"
      )
    return
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  os.environ["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def feature_shapes(config) -> Dict[str, int]:
  """Regions, words and channels of the loss inputs for this config's training batches."""
  sys.path.insert(0, _ROOT)
  from clinvla_jax import api  # pylint: disable=g-import-not-at-top
  from clinvla_jax.data import records  # pylint: disable=g-import-not-at-top

  mcfg = api.model_config(config)
  kept = records.num_kept_patches(float(config.data.mask_ratio), mcfg.image.num_patches)
  return {"regions": len(mcfg.view_slots) * kept, "words": mcfg.text.max_len, "dim": mcfg.proj_dim}


def _loss_and_inputs(part: str, batch: int, shapes: Dict[str, int], loss_cfg, impl: str, mesh):
  """(function of the differentiated inputs, abstract inputs with their shardings)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from clinvla_jax import losses, sharding  # pylint: disable=g-import-not-at-top

  axes = () if impl == "dense" else None

  def spec(shape, dtype=jnp.float32, batched=True):
    where = sharding.batch_sharding(mesh, len(shape)) if batched else sharding.replicated(mesh)
    return jax.ShapeDtypeStruct(shape, dtype, sharding=where)

  regions, words, dim = shapes["regions"], shapes["words"], shapes["dim"]
  masks = (spec((batch, words), bool), spec((batch, regions), bool), spec((batch,), bool))
  if part == "local":
    chunk = int(loss_cfg.get("chunk_size", losses.DEFAULT_CHUNK_SIZE))

    def fn(x, masks):
      word_mask, region_mask, valid = masks
      return losses.gloria_local_loss(
        x["words"], word_mask, x["regions"], region_mask, x["temperatures"], valid, chunk_size=chunk, batch_axes=axes
      )

    x = {
      "words": spec((batch, words, dim)),
      "regions": spec((batch, regions, dim)),
      "temperatures": spec((3,), batched=False),
    }
    return fn, x, masks
  x = {"image": spec((batch, dim)), "text": spec((batch, dim)), "logit_scale": spec((), batched=False)}
  if part == "infonce":

    def fn(x, masks):
      return losses.infonce_loss(
        x["image"], x["text"], x["logit_scale"], masks[2], loss_cfg.max_logit_scale, batch_axes=axes
      )[0]

    return fn, x, masks
  x["logit_bias"] = spec((), batched=False)

  def fn(x, masks):
    return losses.sigmoid_loss(
      x["image"], x["text"], x["logit_scale"], x["logit_bias"], masks[2], loss_cfg.max_logit_scale, batch_axes=axes
    )[0]

  return fn, x, masks


def measure(part: str, impl: str, batch: int, devices: int, config) -> dict:
  """Compiles value_and_grad of one loss on ``devices`` simulated devices; bytes per device."""
  import jax  # pylint: disable=g-import-not-at-top
  from clinvla_jax import sharding  # pylint: disable=g-import-not-at-top

  mesh = sharding.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, jax.devices()[:devices])
  fn, x, masks = _loss_and_inputs(part, batch, feature_shapes(config), config.loss, impl, mesh)
  step = jax.jit(jax.value_and_grad(fn))
  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = step.lower(x, masks).compile()
  mem = compiled.memory_analysis()
  return {
    "part": part,
    "impl": impl,
    "devices": devices,
    "global_batch": batch,
    "temp_bytes_per_device": int(mem.temp_size_in_bytes),
    "arg_bytes_per_device": int(mem.argument_size_in_bytes),
    "output_bytes_per_device": int(mem.output_size_in_bytes),
    "compile_s": round(time.perf_counter() - start, 2),
  }


def growth(rows: Sequence[dict]) -> Dict[str, float]:
  """Temporaries at the largest batch over those at the smallest, per (part, impl)."""
  out = {}
  for part in sorted({r["part"] for r in rows}):
    for impl in IMPLS:
      sel = sorted((r for r in rows if r["part"] == part and r["impl"] == impl), key=lambda r: r["global_batch"])
      if len(sel) >= 2 and sel[0]["temp_bytes_per_device"]:
        out[f"{part}/{impl}"] = sel[-1]["temp_bytes_per_device"] / sel[0]["temp_bytes_per_device"]
  return out


def _machine() -> str:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def run(
  devices: int, batches: Sequence[int], parts: Sequence[str] = PARTS, config_path: str = "", overrides=None
) -> dict:
  """Every (part, impl, batch) row; the device count must be settable (or already there)."""
  _set_device_count(devices)
  sys.path.insert(0, _ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  from clinvla_jax.config import load_config  # pylint: disable=g-import-not-at-top

  config = load_config(config_path or os.path.join(_ROOT, "configs", "base.py"), overrides)
  rows: List[dict] = []
  for part in parts:
    for batch in batches:
      if batch % devices:
        raise ValueError(f"global batch {batch} does not divide over {devices} devices")
      for impl in IMPLS:
        rows.append(measure(part, impl, batch, devices, config))
  return {
    "rows": rows,
    "growth": growth(rows),
    "shapes": feature_shapes(config),
    "chunk_size": int(config.loss.get("chunk_size", 0)),
    "config": config_path or "configs/base.py",
    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    "machine": _machine(),
    "jax": jax.__version__,
  }


def _mib(n: int) -> str:
  return f"{n / 2**20:10.1f}"


def print_table(result: dict) -> None:
  print(f"{'part':>8} {'impl':>8} {'devices':>7} {'batch':>6} {'temp MiB/dev':>12} {'args MiB/dev':>12}")
  for r in result["rows"]:
    print(
      f"{r['part']:>8} {r['impl']:>8} {r['devices']:>7} {r['global_batch']:>6} "
      f"{_mib(r['temp_bytes_per_device']):>12} {_mib(r['arg_bytes_per_device']):>12}"
    )
  batches = sorted({r["global_batch"] for r in result["rows"]})
  print(
    f"temporaries per device, growth from batch {batches[0]} to {batches[-1]} (batch x{batches[-1] / batches[0]:g}):"
  )
  for key, value in result["growth"].items():
    print(f"  {key:>18}: x{value:.2f}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--batches", default="64,128,256,512")
  parser.add_argument("--parts", default=",".join(PARTS))
  parser.add_argument("--config", default="", help="config file (default configs/base.py)")
  parser.add_argument("--chunk_size", type=int, default=0, help="texts per GLoRIA block (0: the config's)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  parts = [p for p in args.parts.split(",") if p]
  unknown = sorted(set(parts) - set(PARTS))
  if unknown:
    parser.error(f"unknown parts {unknown}; known: {list(PARTS)}")
  overrides = {"loss.chunk_size": args.chunk_size} if args.chunk_size else None
  result = run(args.devices, [int(b) for b in args.batches.split(",") if b], parts, args.config, overrides)
  print_table(result)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
