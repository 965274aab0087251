r"""XLA compiler options compared in one process: the base train step and embedding under each variant.

Separate processes on a shared host drift by +-10 % between runs, more than most
flags change.  Here every variant is compiled in the same process (per-compilation
``compiler_options``, which take XLA debug-option names without the leading
``--``), and the variants and PyTorch take turns step by step, so all see the
same load.  Same model, batch and optimizer as ``benchmarks/vs_pytorch.py``.

  python benchmarks/xla_options.py --config=tiny --batch=2 --steps=2
  python benchmarks/xla_options.py --config=base --batch=8 --steps=5 \
      --variant='xnnpack={"xla_cpu_use_xnnpack": true}' \
      --variant='vector512={"xla_cpu_prefer_vector_width": 512}' --out=/tmp/xla_options.json

The variant "default" (no options) is always included.  Results per variant:
median and min seconds, and the time relative to "default" and to PyTorch.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clinvla_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_host_runtime()

import json
from typing import Dict, Optional, Sequence

import jax

from benchmarks import vs_pytorch
from clinvla_jax import api


def parse_variant(text: str):
  """'NAME={"option": value, ...}' -> (NAME, dict)."""
  name, sep, options = text.partition("=")
  if not sep or not name:
    raise ValueError(f"variant {text!r}: expected NAME=JSON, e.g. 'xnn={{\"xla_cpu_use_xnnpack\": true}}'")
  try:
    parsed = json.loads(options)
  except json.JSONDecodeError as e:
    raise ValueError(f"variant {name!r}: options are not JSON ({e})") from e
  if not isinstance(parsed, dict):
    raise ValueError(f"variant {name!r}: options must be a JSON object, got {options!r}")
  return name, parsed


def compare(
  config: str,
  batch: int,
  variants: Dict[str, Dict],
  steps: int = 5,
  warmup: int = 1,
  parts: Sequence[str] = ("train", "embed"),
  with_torch: bool = True,
) -> Dict:
  from clinvla_jax.data import records  # pylint: disable=g-import-not-at-top

  variants = {"default": {}, **variants}
  cfg = vs_pytorch.build_config(config)
  mcfg = api.model_config(cfg)
  num_kept = records.num_kept_patches(float(cfg.data.mask_ratio), mcfg.image.num_patches)
  params = api.init_params(cfg, jax.random.key(0))["params"]
  host_params = jax.device_get(params)
  result = {
    "config": config,
    "batch": batch,
    "steps": steps,
    "warmup": warmup,
    "variants": variants,
    "machine": vs_pytorch.machine_description(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "load_average_start": list(os.getloadavg()),
  }
  if with_torch:
    import torch  # pylint: disable=g-import-not-at-top
    from benchmarks import torch_clinvla  # pylint: disable=g-import-not-at-top

    _, torch_train, torch_embed = vs_pytorch.make_torch(cfg, host_params, torch.device("cpu"), "float32")
  for part in parts:
    if part == "train":
      data = vs_pytorch.synthetic_batch(mcfg, batch, num_kept, seed=0)
    elif part == "embed":
      data = vs_pytorch.synthetic_batch(mcfg, batch, mcfg.image.num_patches, seed=1, views=1)
      data["view_valid"][:] = True
    else:
      raise ValueError(f"part {part!r}: expected train or embed")
    fns = {}
    for name, options in variants.items():
      vs_pytorch.log(f"compiling {part} [{name}] {options}")
      if part == "train":
        step, state, _, _ = vs_pytorch.make_jax_train(cfg, params, data, compiler_options=options)
        fns[name] = vs_pytorch.jax_train_runner(step, state, data)
      else:
        fns[name], _ = vs_pytorch.make_jax_embed(cfg, {"params": params}, data, compiler_options=options)
    if with_torch:
      tbatch = torch_clinvla.to_torch_batch(data)
      fns["torch"] = (lambda: torch_train(tbatch)) if part == "train" else (lambda: torch_embed(tbatch))
    vs_pytorch.log(f"timing {part}: {', '.join(fns)} in turn")
    times = vs_pytorch.time_alternating(fns, warmup, steps)
    rows = {}
    for name, ts in times.items():
      rows[name] = {"median_s": vs_pytorch.median(ts), "min_s": min(ts), "times": ts}
    for row in rows.values():
      row["vs_default"] = row["median_s"] / rows["default"]["median_s"]
      if "torch" in rows:
        row["vs_torch"] = row["median_s"] / rows["torch"]["median_s"]
    result[part] = rows
  result["load_average_end"] = list(os.getloadavg())
  return result


def print_table(result: Dict) -> None:
  print(f"\n== XLA options, {result['config']} batch {result['batch']}, {result['machine']}")
  for part in ("train", "embed"):
    if part not in result:
      continue
    print(f"{part:6s} {'variant':16s} {'median s':>9s} {'min s':>8s} {'/default':>9s} {'/torch':>7s}")
    for name, row in result[part].items():
      vs_torch = f"{row['vs_torch']:7.3f}" if "vs_torch" in row else f"{'':7s}"
      print(f"{'':6s} {name:16s} {row['median_s']:9.3f} {row['min_s']:8.3f} {row['vs_default']:9.3f} {vs_torch}")


def main(argv: Optional[Sequence[str]] = None) -> Dict:
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="tiny", help="tiny | base | a path to a config file.")
  parser.add_argument("--batch", type=int, default=8, help="Studies per step.")
  parser.add_argument("--steps", type=int, default=5, help="Timed steps per variant and part.")
  parser.add_argument("--warmup", type=int, default=1, help="Untimed steps per variant and part.")
  parser.add_argument(
    "--variant",
    action="append",
    default=[],
    help='NAME={"xla_option": value, ...}; repeatable. "default" is always run.',
  )
  parser.add_argument("--parts", default="train,embed", help="Comma-separated: train, embed.")
  parser.add_argument("--no_torch", action="store_true", help="Leave PyTorch out.")
  parser.add_argument("--out", default=None, help="Write the results here as JSON.")
  args = parser.parse_args(argv)
  variants = dict(parse_variant(v) for v in args.variant)
  result = compare(
    args.config,
    args.batch,
    variants,
    args.steps,
    args.warmup,
    tuple(p for p in args.parts.split(",") if p),
    with_torch=not args.no_torch,
  )
  print_table(result)
  if args.out:
    vs_pytorch.write_json(args.out, result)
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
