r"""Where the JAX train step's time goes: a profile of the compiled step, by operation kind.

Runs the benchmark's train step (``benchmarks/vs_pytorch.py``: the same model,
batch and optimizer) under ``jax.profiler.trace``, reads the trace's XLA
operation events and sums their durations by kind, using the compiled HLO to
tell what each operation is:

* matmul: dots, and fusions or custom calls that contain one (oneDNN/Eigen
  matmuls on CPU, cuBLAS/cuDNN on GPU);
* fused elementwise / reduction: the remaining fusions (softmax, GELU, layer
  norm, masking, the optimizer update);
* data movement: copies, transposes, concatenations, slices, gathers,
  scatters, dynamic slices/updates, pads, broadcasts;
* other: everything else (control flow, constants, random bits, ...).

Each kind's share is of the summed operation time.  Wall time of the profiled
steps and the operations' summed time are both printed: their difference is
time outside XLA operations (dispatch, Python) plus any parallel overlap.

  python benchmarks/profile_step.py --config=tiny --batch=4
  python benchmarks/profile_step.py --config=base --batch=8 --steps=2 --out=/tmp/profile_base.json
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clinvla_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_host_runtime()

import collections
import glob
import gzip
import json
import re
import tempfile
import time
from typing import Dict, Iterable, List, Optional, Tuple

import jax

KINDS = ("matmul", "fused elementwise / reduction", "data movement", "other")
_DATA_MOVEMENT = {
  "copy",
  "transpose",
  "concatenate",
  "slice",
  "dynamic-slice",
  "dynamic-update-slice",
  "gather",
  "scatter",
  "pad",
  "broadcast",
  "reshape",
  "bitcast",
  "copy-start",
  "copy-done",
  "reverse",
  "select-and-scatter",
}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][a-z\-]*)\(")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_CUSTOM_TARGET = re.compile(r'custom_call_target="([^"]+)"')


def _computations(hlo_text: str) -> Dict[str, List[Tuple[str, str, str]]]:
  """Computation name -> its (instruction name, opcode, line)s."""
  computations: Dict[str, List[Tuple[str, str, str]]] = {}
  current = None
  for line in hlo_text.splitlines():
    stripped = line.strip()
    if (
      stripped.endswith("{")
      and ("(" in stripped)
      and not stripped.startswith("ROOT")
      and "=" not in stripped.split("(")[0]
    ):
      # A computation header: "%name (params) -> shape {" or "ENTRY %name ...".
      head = stripped.split("(")[0].replace("ENTRY", "").strip().lstrip("%")
      current = computations.setdefault(head, [])
      continue
    match = _INSTRUCTION.match(line)
    if match and current is not None:
      current.append((match.group(1), match.group(2), line))
  return computations


# What a non-matmul operation is for, told by the opcodes it contains; the
# first match wins (a softmax fusion also reduces).  XLA:CPU expands erf into
# polynomials and hoists LayerNorm's rsqrt into tiny fusions before this
# point, so GELU and LayerNorm work lands in "other elementwise".
PARTS = (
  "matmul",
  "random bits (dropout)",
  "softmax (exp)",
  "dtype converts",
  "transposes / copies",
  "bias / residual adds",
  "other elementwise",
)


def hlo_operation_parts(hlo_text: str, kinds: Dict[str, str]) -> Dict[str, str]:
  """Instruction name -> one of ``PARTS``: a finer split of the non-matmul time."""
  computations = _computations(hlo_text)

  def opcodes(computation: str, seen=()) -> set:
    found = set()
    for _, opcode, line in computations.get(computation, ()):
      found.add(opcode)
      for callee in _CALLS.findall(line):
        if callee not in seen:
          found |= opcodes(callee, seen + (computation,))
    return found

  parts = {}
  for instructions in computations.values():
    for name, opcode, line in instructions:
      if kinds.get(name) == "matmul":
        parts[name] = "matmul"
        continue
      ops = {opcode}
      for callee in _CALLS.findall(line):
        ops |= opcodes(callee)
      moves = ops <= _DATA_MOVEMENT | {"parameter", "tuple", "get-tuple-element", "fusion", "constant"}
      if "rng-bit-generator" in ops or {"shift-right-logical", "xor"} <= ops:
        part = "random bits (dropout)"
      elif "exponential" in ops:
        part = "softmax (exp)"
      elif "convert" in ops and ops <= _DATA_MOVEMENT | {
        "convert",
        "parameter",
        "tuple",
        "get-tuple-element",
        "fusion",
        "constant",
      }:
        part = "dtype converts"
      elif moves and ops & {"transpose", "copy"}:
        part = "transposes / copies"
      elif "add" in ops and ops <= _DATA_MOVEMENT | {"add", "convert", "parameter", "fusion", "constant"}:
        part = "bias / residual adds"
      else:
        part = "other elementwise"
      parts[name] = part
  return parts


def hlo_operation_kinds(hlo_text: str) -> Dict[str, str]:
  """Instruction name -> kind, for every instruction of the compiled module."""
  computations = _computations(hlo_text)

  def contains_dot(computation: str, seen=()) -> bool:
    for _, opcode, line in computations.get(computation, ()):
      if opcode in ("dot", "convolution") or (opcode == "custom-call" and _is_matmul_call(line)):
        return True
      for callee in _CALLS.findall(line):
        if callee not in seen and contains_dot(callee, seen + (computation,)):
          return True
    return False

  kinds = {}
  for instructions in computations.values():
    for name, opcode, line in instructions:
      if opcode in ("dot", "convolution"):
        kind = "matmul"
      elif opcode == "custom-call":
        kind = "matmul" if _is_matmul_call(line) else "other"
      elif opcode == "fusion":
        callees = _CALLS.findall(line)
        if any(contains_dot(c) for c in callees):
          kind = "matmul"
        elif re.match(r"(copy|transpose|bitcast|concatenate|slice|dynamic|gather|scatter|pad|broadcast)", name):
          # XLA names a fusion after its root: these only move data.
          kind = "data movement"
        else:
          kind = "fused elementwise / reduction"
      elif opcode in _DATA_MOVEMENT:
        kind = "data movement"
      elif opcode in (
        "reduce",
        "reduce-window",
        "add",
        "multiply",
        "exponential",
        "divide",
        "subtract",
        "maximum",
        "select",
        "compare",
        "convert",
        "tanh",
        "rsqrt",
        "sqrt",
        "log",
      ):
        kind = "fused elementwise / reduction"
      else:
        kind = "other"
      kinds[name] = kind
  return kinds


def _is_matmul_call(line: str) -> bool:
  target = _CUSTOM_TARGET.search(line)
  name = (target.group(1) if target else "").lower()
  return any(word in name for word in ("matmul", "gemm", "conv", "dot", "cublas", "cudnn", "onednn"))


def trace_events(log_dir: str) -> List[dict]:
  paths = sorted(glob.glob(os.path.join(log_dir, "plugins", "profile", "*", "*.trace.json.gz")))
  if not paths:
    raise FileNotFoundError(f"no *.trace.json.gz under {log_dir}/plugins/profile")
  with gzip.open(paths[-1], "rb") as f:
    return [e for e in json.load(f).get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]


def breakdown(events: Iterable[dict], kinds: Dict[str, str], parts: Optional[Dict[str, str]] = None) -> Dict:
  """Sums the durations of events named after compiled-module instructions (by kind, and by part)."""
  by_name: Dict[str, float] = collections.defaultdict(float)
  for event in events:
    name = event.get("name", "")
    if name in kinds:
      by_name[name] += event["dur"] * 1e-6
  by_kind = {k: 0.0 for k in KINDS}
  for name, seconds in by_name.items():
    by_kind[kinds[name]] += seconds
  total = sum(by_kind.values())
  by_part = {p: 0.0 for p in PARTS}
  for name, seconds in by_name.items():
    by_part[(parts or {}).get(name, "other elementwise")] += seconds
  return {
    "op_seconds_total": total,
    "op_seconds_by_kind": by_kind,
    "op_seconds_by_part": by_part,
    "op_share_by_kind": {k: (v / total if total else 0.0) for k, v in by_kind.items()},
    "ops": sorted(
      ({"name": n, "kind": kinds[n], "seconds": s} for n, s in by_name.items()), key=lambda o: -o["seconds"]
    ),
  }


def profile(
  config: str,
  batch: int,
  steps: int,
  dtype: str = "float32",
  part: str = "train",
  precision: str = "auto",
  hlo_out: Optional[str] = None,
) -> Dict:
  """part: "train" (the train step) or "embed" (inference embedding of one frontal view + report)."""
  from benchmarks import vs_pytorch  # pylint: disable=g-import-not-at-top
  from clinvla_jax import api  # pylint: disable=g-import-not-at-top
  from clinvla_jax.data import records  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  cfg = vs_pytorch.build_config(config, dtype=dtype, precision=precision)
  mcfg = api.model_config(cfg)
  num_kept = records.num_kept_patches(float(cfg.data.mask_ratio), mcfg.image.num_patches)
  params = api.init_params(cfg, jax.random.key(0))["params"]
  if part == "train":
    batch_np = vs_pytorch.synthetic_batch(mcfg, batch, num_kept, seed=0)
    step, state, compiled, _ = vs_pytorch.make_jax_train(cfg, params, batch_np)
    jbatch = {k: jnp.asarray(v) for k, v in batch_np.items()}
    holder = {"state": state}

    def run_once():
      holder["state"], loss = step(holder["state"], jbatch)
      loss.block_until_ready()
  elif part == "embed":
    batch_np = vs_pytorch.synthetic_batch(mcfg, batch, mcfg.image.num_patches, seed=1, views=1)
    batch_np["view_valid"][:] = True
    run_once, compiled = vs_pytorch.make_jax_embed(cfg, {"params": params}, batch_np)
  else:
    raise ValueError(f"part must be train or embed, got {part!r}")
  hlo_text = compiled.as_text()
  if hlo_out:
    with open(hlo_out, "w") as f:
      f.write(hlo_text)
  kinds = hlo_operation_kinds(hlo_text)
  parts = hlo_operation_parts(hlo_text, kinds)
  run_once()
  with tempfile.TemporaryDirectory() as log_dir:
    t = time.perf_counter()
    with jax.profiler.trace(log_dir):
      for _ in range(steps):
        run_once()
    wall = time.perf_counter() - t
    events = trace_events(log_dir)
  result = breakdown(events, kinds, parts)
  result.update(
    {
      "part": part,
      "config": config,
      "batch": batch,
      "steps": steps,
      "dtype": dtype,
      "wall_s": wall,
      "wall_s_per_step": wall / steps,
      "device_kind": jax.devices()[0].device_kind,
      "matched_instructions": len(result["ops"]),
      "hlo_instructions": len(kinds),
    }
  )
  return result


def print_breakdown(r: Dict, top: int) -> None:
  print(
    f"\n== profile of the {r['part']} step: ClinVLA {r['config']}, batch {r['batch']}, {r['dtype']}, {r['device_kind']}, "
    f"{r['steps']} steps"
  )
  print(
    f"   wall {r['wall_s_per_step']:.4f} s/step; XLA operations {r['op_seconds_total'] / r['steps']:.4f} s/step "
    f"({r['matched_instructions']} of {r['hlo_instructions']} instructions seen in the trace)"
  )
  for kind in KINDS:
    print(
      f"   {kind:32s} {r['op_seconds_by_kind'][kind] / r['steps']:9.4f} s/step  "
      f"{100 * r['op_share_by_kind'][kind]:5.1f} %"
    )
  total = r["op_seconds_total"] or 1.0
  print("   by part (what the operations compute):")
  for part, seconds in sorted(r.get("op_seconds_by_part", {}).items(), key=lambda kv: -kv[1]):
    print(f"   {part:32s} {seconds / r['steps']:9.4f} s/step  {100 * seconds / total:5.1f} %")
  print(f"   top {top} operations (s/step):")
  for op in r["ops"][:top]:
    print(f"     {op['seconds'] / r['steps']:9.4f}  {op['kind']:32s} {op['name']}")


def main():
  # argparse, not absl flags: the benchmark module imported here defines its own.
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="tiny", help="tiny | base | a path to a config file.")
  parser.add_argument("--batch", type=int, default=4, help="Studies per step.")
  parser.add_argument("--steps", type=int, default=2, help="Profiled steps (after one untimed step).")
  parser.add_argument(
    "--dtype",
    default="float32",
    choices=["float32", "bfloat16"],
    help="float32, or bfloat16: the precision policy --precision.",
  )
  parser.add_argument("--precision", default="auto", help="Policy with --dtype=bfloat16 (model.precision).")
  parser.add_argument("--part", default="train", choices=["train", "embed"], help="What to profile.")
  parser.add_argument("--top", type=int, default=15, help="Operations listed individually.")
  parser.add_argument("--out", default=None, help="Write the breakdown here as JSON.")
  parser.add_argument("--hlo_out", default=None, help="Write the compiled HLO text here (op names match --out).")
  args = parser.parse_args()
  result = profile(args.config, args.batch, args.steps, args.dtype, args.part, args.precision, args.hlo_out)
  print_breakdown(result, args.top)
  if args.out:
    from benchmarks import vs_pytorch  # pylint: disable=g-import-not-at-top

    vs_pytorch.write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
