"""Peak FLOP rates for MFU estimates."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

# Dense bf16 tensor-core peaks, FLOP/s per device.
PEAK_BF16 = {"a100": 312e12, "h100": 989e12, "h200": 989e12, "b200": 2250e12, "l4": 121e12,
             "v5e": 197e12, "v5p": 459e12, "v4": 275e12}


@functools.lru_cache(maxsize=None)
def measured_matmul_flops(size: int = 2048, repeats: int = 5) -> float:
  """Median FLOP/s of a large fp32 matmul on the default device (the CPU peak)."""
  a = jnp.ones((size, size), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  times.sort()
  return 2 * size ** 3 / times[len(times) // 2]


def peak_flops_per_device(override: float = 0.0) -> float:
  if override:
    return float(override)
  device = jax.devices()[0]
  kind = device.device_kind.lower()
  for name, peak in PEAK_BF16.items():
    if name in kind:
      return peak
  if device.platform == "cpu":
    return measured_matmul_flops()
  return 0.0
