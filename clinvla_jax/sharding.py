"""Meshes, logical-axis rules, global batches and multi-process start-up.

The mesh has axes ('data', 'fsdp', 'tensor').  Parameters and activations
carry logical axis names (``clinvla_jax.model.layers``); the rules in
``config.sharding.rules`` map them to mesh axes:

* pure data parallel (default): batch over ('data', 'fsdp'), every parameter
  replicated;
* FSDP: parameter ``embed`` dimensions (and with them the optimizer state)
  sharded over 'fsdp';
* tensor parallel: attention heads and MLP hidden units split over 'tensor'.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def initialize_distributed(
  coordinator_address: Optional[str] = None, num_processes: Optional[int] = None, process_id: Optional[int] = None
) -> None:
  """Starts multi-process JAX when asked to (flags or cluster environment).

  Explicit arguments win; otherwise JAX's cluster auto-detection (SLURM, Open
  MPI, Cloud TPU, Kubernetes...) is used where JAX_COORDINATOR_ADDRESS or a
  known scheduler is present.  A single process needs nothing.
  """
  if coordinator_address or num_processes:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  elif (
    any(
      k in os.environ
      for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")
    )
    and int(os.environ.get("SLURM_NTASKS", "2")) > 1
  ):
    jax.distributed.initialize()
  else:
    return
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def make_mesh(mesh_cfg, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """Mesh from {'data': n, 'fsdp': n, 'tensor': n}; one -1 takes the remaining devices."""
  from clinvla_jax.config import ConfigError, problem  # pylint: disable=g-import-not-at-top

  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  given = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ConfigError([problem("mesh", given, "at most one axis may be -1 (all remaining devices)")])
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError([problem("mesh", given, f"the fixed axes must divide the {len(devices)} devices")])
    sizes[sizes.index(-1)] = len(devices) // known
  if int(np.prod(sizes)) != len(devices):
    raise ConfigError(
      [problem("mesh", given, f"needs {int(np.prod(sizes))} devices, {len(devices)} available (or use -1)")]
    )
  # jax.make_mesh orders the devices by the physical topology (TPU slices, GPU
  # hosts), so the innermost mesh axes (tensor, then fsdp) land on the closest
  # chips.  Auto axis types: Flax linen's logical partitioning works in that mode.
  return jax.make_mesh(
    tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def check_batch_divides(mesh: Mesh, batch_size: int, field: str = "optim.batch_size") -> None:
  """The global batch splits evenly over the batch axes (mesh.data x mesh.fsdp): ConfigError naming both."""
  from clinvla_jax.config import ConfigError, problem  # pylint: disable=g-import-not-at-top

  parallel = int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
  if int(batch_size) % parallel:
    sizes = " x ".join(f"mesh.{a} = {mesh.shape[a]}" for a in BATCH_AXES)
    raise ConfigError([problem(field, batch_size, f"must be divisible by the data-parallel size {sizes} = {parallel}")])


def logical_rules(config) -> Tuple[Tuple[str, Any], ...]:
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config.sharding.rules)


def param_shardings(boxed_abstract, mesh: Mesh, rules):
  """NamedShardings for a tree of nn.Partitioned (abstract) parameters."""
  specs = nn.get_partition_spec(boxed_abstract)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def global_batch(local_batch: Dict[str, np.ndarray], mesh: Mesh, keys: Sequence[str]) -> Dict[str, jax.Array]:
  """Per-process numpy batch -> global arrays sharded over the batch axes."""
  out = {}
  for key in keys:
    local = np.asarray(local_batch[key])
    out[key] = jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local)
  return out
