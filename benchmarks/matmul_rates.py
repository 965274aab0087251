r"""Matrix-product rates of JAX (XLA) and PyTorch on the shapes of the ClinVLA base step.

The train step and the embedding are mostly matrix products (benchmarks/profile_step.py),
so the rate each framework reaches on these shapes bounds how the whole step compares.
Each product is jitted alone (JAX) or called eagerly (PyTorch), fp32, alternating, best
of --repeats after a warm-up.

  python benchmarks/matmul_rates.py
  python benchmarks/matmul_rates.py --scale=0.25 --repeats=3      # small shapes, quick
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from clinvla_jax import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure_host_runtime()

import time
from typing import Dict, List

import jax
import jax.numpy as jnp
import numpy as np

# (name, einsum, lhs shape, rhs shape) at batch 8: 1600 image tokens (4 views x 50), hidden 768, MLP 3072,
# 12 heads of 64; 1024 report tokens.
BASE_SHAPES = (
  ("ViT MLP in, forward", "mk,kn->mn", (1600, 768), (768, 3072)),
  ("ViT MLP in, input gradient", "mn,kn->mk", (1600, 3072), (768, 3072)),
  ("ViT qkv, forward", "mk,kn->mn", (1600, 768), (768, 2304)),
  ("adapter weight gradient", "nk,nd->kd", (1600, 64), (1600, 768)),
  ("ViT attention logits", "bqd,bkd->bqk", (384, 50, 64), (384, 50, 64)),
  ("BERT attention logits", "bqd,bkd->bqk", (96, 128, 64), (96, 128, 64)),
  ("square 2048", "mk,kn->mn", (2048, 2048), (2048, 2048)),
)


def _flops(equation: str, lhs_shape, rhs_shape) -> float:
  # 2 per multiply-accumulate: 2 x the product of the sizes of all distinct index letters.
  a, b = equation.split("->")[0].split(",")
  size = {**dict(zip(a, lhs_shape)), **dict(zip(b, rhs_shape))}
  return 2.0 * float(np.prod([size[c] for c in set(a) | set(b)]))


def _best(fn, repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return min(times)


def measure(scale: float = 1.0, repeats: int = 8) -> List[Dict]:
  import torch  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(0)
  rows = []
  for name, equation, lhs_shape, rhs_shape in BASE_SHAPES:
    lhs_shape = tuple(max(1, int(round(d * scale))) for d in lhs_shape)
    # Keep shared letters the same size on both sides.
    a, b = equation.split("->")[0].split(",")
    sizes = dict(zip(a, lhs_shape))
    rhs_shape = tuple(sizes.get(c, max(1, int(round(d * scale)))) for c, d in zip(b, rhs_shape))
    lhs = rng.rand(*lhs_shape).astype(np.float32)
    rhs = rng.rand(*rhs_shape).astype(np.float32)
    flops = _flops(equation, lhs_shape, rhs_shape)
    f = jax.jit(lambda x, y, eq=equation: jnp.einsum(eq, x, y))
    jl, jr = jnp.asarray(lhs), jnp.asarray(rhs)
    tl, tr = torch.from_numpy(lhs), torch.from_numpy(rhs)
    jax_s = _best(lambda: f(jl, jr).block_until_ready(), repeats)
    torch_s = _best(lambda: torch.einsum(equation, tl, tr), repeats)
    rows.append(
      {
        "name": name,
        "equation": equation,
        "lhs": list(lhs_shape),
        "rhs": list(rhs_shape),
        "flops": flops,
        "jax_s": jax_s,
        "torch_s": torch_s,
        "jax_gflops": flops / jax_s / 1e9,
        "torch_gflops": flops / torch_s / 1e9,
        "jax_over_torch_time": jax_s / torch_s,
      }
    )
  return rows


def main():
  import argparse  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--scale", type=float, default=1.0, help="Multiply every dimension by this.")
  parser.add_argument("--repeats", type=int, default=8, help="Timed calls per product and framework.")
  parser.add_argument("--out", default=None, help="Write the rows here as JSON.")
  args = parser.parse_args()
  rows = measure(args.scale, args.repeats)
  print(
    f"{'product':30s} {'lhs':>16s} {'rhs':>16s} {'JAX ms':>9s} {'GF/s':>6s} {'torch ms':>9s} {'GF/s':>6s} "
    f"{'JAX/torch':>9s}"
  )
  for r in rows:
    print(
      f"{r['name']:30s} {str(tuple(r['lhs'])):>16s} {str(tuple(r['rhs'])):>16s} {1e3 * r['jax_s']:9.2f} "
      f"{r['jax_gflops']:6.0f} {1e3 * r['torch_s']:9.2f} {r['torch_gflops']:6.0f} "
      f"{r['jax_over_torch_time']:9.2f}"
    )
  if args.out:
    from benchmarks import vs_pytorch  # pylint: disable=g-import-not-at-top

    vs_pytorch.write_json(args.out, {"machine": vs_pytorch.machine_description(), "rows": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
