"""The two layouts of the towers' block parameters, and pure functions between them.

Loop layout (``scan_layers=False``, the default): one subtree per block,
``image_tower/blocks_{i}/...`` and ``text_tower/layer_{i}/...``.  Scan layout
(``scan_layers=True``): one subtree, ``image_tower/blocks/...`` and
``text_tower/layer/...``, whose leaves carry a leading axis of length
``num_layers`` (block ``i`` is index ``i``).  Everything else in the tree is the
same in both.

``stack_layers`` / ``unstack_layers`` find the towers anywhere in a tree (a
variables dict, a parameter tree, a trainable subset, an optimizer state) and
convert their block subtrees; all other nodes are copied unchanged.  Leaves may
be numpy or JAX arrays (also traced ones, so the functions can run under jit),
``jax.ShapeDtypeStruct`` (a ``NamedSharding`` gains or loses a leading
unsharded axis) or ``nn.Partitioned`` boxes (the logical name
``layers.LAYERS_AXIS`` is added or removed).
"""

from __future__ import annotations

import re
from typing import Dict, Iterable, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import FrozenDict
from jax.sharding import NamedSharding, PartitionSpec

from clinvla_jax.model import bert, layers, vit

# Tower subtree -> the name of its blocks (loop: "{name}_{i}", scan: "{name}").
BLOCK_NAMES: Dict[str, str] = {"image_tower": vit.BLOCKS, "text_tower": bert.LAYERS}
LOOP, SCAN = "loop", "scan"


def _towers(towers: Optional[Iterable[str]]) -> Sequence[str]:
  towers = tuple(BLOCK_NAMES) if towers is None else tuple(towers)
  unknown = [t for t in towers if t not in BLOCK_NAMES]
  if unknown:
    raise ValueError(f"unknown towers {unknown}; expected some of {tuple(BLOCK_NAMES)}")
  return towers


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _stack_sharding(sharding):
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
  return None


def _unstack_sharding(sharding):
  if isinstance(sharding, NamedSharding):
    return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
  return None


def _stack_leaves(*xs):
  first = xs[0]
  if _is_box(first):
    return first.replace(value=_stack_leaves(*(x.value for x in xs)), names=(layers.LAYERS_AXIS, *first.names))
  if isinstance(first, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(xs), *first.shape), first.dtype, sharding=_stack_sharding(first.sharding))
  if any(isinstance(x, jax.Array) for x in xs):
    return jnp.stack(xs)
  return np.stack([np.asarray(x) for x in xs])


def _unstack_leaf(x, i: int):
  if _is_box(x):
    names = tuple(x.names)
    return x.replace(value=_unstack_leaf(x.value, i), names=names[1:] if names else names)
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=_unstack_sharding(x.sharding))
  return x[i]


def _leading_dim(x) -> int:
  return (x.value if _is_box(x) else x).shape[0]


def _loop_indices(tower: Mapping, name: str) -> list:
  pattern = re.compile(rf"{re.escape(name)}_(\d+)")
  return sorted(int(m.group(1)) for m in (pattern.fullmatch(str(k)) for k in tower) if m)


def _stack_tower(tower: Mapping, name: str, where: str) -> dict:
  indices = _loop_indices(tower, name)
  out = {k: v for k, v in tower.items()}
  if not indices:
    return out
  if name in tower:
    raise ValueError(f"{where} holds both {name!r} and {name}_<i> subtrees")
  if indices != list(range(len(indices))):
    raise ValueError(
      f"{where}: blocks {indices} are not 0..{len(indices) - 1}; only a tree with every block can be stacked"
    )
  per_block = [out.pop(f"{name}_{i}") for i in indices]
  try:
    out[name] = jax.tree_util.tree_map(_stack_leaves, *per_block, is_leaf=_is_box)
  except ValueError as e:
    raise ValueError(f"{where}: the {name}_<i> subtrees differ in structure, so they cannot be stacked: {e}") from e
  return out


def _stacked_sizes(tower: Mapping, name: str) -> set:
  return {_leading_dim(x) for x in jax.tree_util.tree_leaves(tower.get(name, {}), is_leaf=_is_box)}


def _unstack_tower(tower: Mapping, name: str, where: str, num_blocks: Optional[int]) -> dict:
  out = {k: v for k, v in tower.items()}
  if name not in tower:
    return out
  if _loop_indices(tower, name):
    raise ValueError(f"{where} holds both {name!r} and {name}_<i> subtrees")
  stacked = out.pop(name)
  sizes = _stacked_sizes(tower, name) | ({num_blocks} if num_blocks is not None else set())
  if len(sizes) > 1:
    raise ValueError(f"{where}/{name}: leaves disagree on the number of blocks {sorted(sizes)}")
  if not sizes:
    raise ValueError(f"{where}/{name} holds no arrays to count the blocks by; pass num_blocks")
  for i in range(sizes.pop()):
    out[f"{name}_{i}"] = jax.tree_util.tree_map(lambda x, i=i: _unstack_leaf(x, i), stacked, is_leaf=_is_box)
  return out


def _map_towers(tree, fn, towers: Sequence[str], where: str = ""):
  """``tree`` with ``fn(tower_name, subtree, path)`` applied to each tower's subtree, wherever it lies."""
  if isinstance(tree, Mapping):
    out = {}
    for key, value in tree.items():
      path = f"{where}/{key}" if where else str(key)
      if key in towers and isinstance(value, Mapping):
        out[key] = fn(key, value, path)
      else:
        out[key] = _map_towers(value, fn, towers, path)
    return FrozenDict(out) if isinstance(tree, FrozenDict) else out
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):  # NamedTuple: optax states
    return type(tree)(*(_map_towers(v, fn, towers, f"{where}/{f}") for f, v in zip(tree._fields, tree)))
  if isinstance(tree, (tuple, list)):
    return type(tree)(_map_towers(v, fn, towers, f"{where}/{i}") for i, v in enumerate(tree))
  return tree


def stack_layers(tree, towers: Optional[Iterable[str]] = None):
  """``tree`` with the named towers' (default: both) per-block subtrees stacked into the scan layout.

  A tower already in the scan layout, or holding no block parameters, is left
  as it is.  Raises ValueError when only some blocks are present or their
  subtrees differ in structure.
  """
  names = _towers(towers)
  return _map_towers(tree, lambda t, sub, path: _stack_tower(sub, BLOCK_NAMES[t], path), names)


def unstack_layers(tree, towers: Optional[Iterable[str]] = None, num_blocks: Optional[Mapping[str, int]] = None):
  """The inverse of ``stack_layers``: the named towers' stacked blocks split into ``{name}_{i}`` subtrees.

  The number of blocks is the leading dimension of the stacked leaves.  A
  stacked subtree with no arrays (an optimizer state's masked-out part) takes
  it from the same tower elsewhere in ``tree``, or from ``num_blocks``
  ({tower: n}).
  """
  names = _towers(towers)
  counts = dict(num_blocks or {})
  for tower in names:
    if tower in counts:
      continue
    sizes = set()
    _map_towers(tree, lambda t, sub, path: sizes.update(_stacked_sizes(sub, BLOCK_NAMES[t])) or sub, [tower])
    if len(sizes) > 1:
      raise ValueError(f"{tower}: stacked leaves disagree on the number of blocks {sorted(sizes)}")
    if sizes:
      counts[tower] = sizes.pop()
  return _map_towers(tree, lambda t, sub, path: _unstack_tower(sub, BLOCK_NAMES[t], path, counts.get(t)), names)


def path_layouts(paths: Iterable[str]) -> Dict[str, Optional[str]]:
  """{tower: "loop" | "scan" | None (no block parameters)} from "/"-joined parameter paths."""
  found: Dict[str, set] = {t: set() for t in BLOCK_NAMES}
  for path in paths:
    keys = path.split("/")
    for tower, name in BLOCK_NAMES.items():
      for above, below in zip(keys, keys[1:]):
        if above != tower:
          continue
        if below == name:
          found[tower].add(SCAN)
        elif re.fullmatch(rf"{re.escape(name)}_\d+", below):
          found[tower].add(LOOP)
  out: Dict[str, Optional[str]] = {}
  for tower, kinds in found.items():
    if len(kinds) > 1:
      raise ValueError(f"{tower} holds blocks in both the loop and the scan layout")
    out[tower] = kinds.pop() if kinds else None
  return out


def layer_layouts(tree) -> Dict[str, Optional[str]]:
  """{tower: "loop" | "scan" | None} of any tree holding tower subtrees (see ``path_layouts``)."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=_is_box)
  return path_layouts(jax.tree_util.keystr(path, simple=True, separator="/") for path, _ in leaves)


def model_layouts(mcfg) -> Dict[str, str]:
  """{tower: "loop" | "scan"} of a ``ClinVLAConfig``."""
  return {
    "image_tower": SCAN if mcfg.image.scan_layers else LOOP,
    "text_tower": SCAN if mcfg.text.scan_layers else LOOP,
  }


def to_layouts(tree, layouts: Mapping[str, Optional[str]]):
  """``tree`` with each tower named in ``layouts`` in that layout ("loop" / "scan"; None leaves it)."""
  stack = [t for t, kind in layouts.items() if kind == SCAN]
  unstack = [t for t, kind in layouts.items() if kind == LOOP]
  bad = {t: kind for t, kind in layouts.items() if kind not in (LOOP, SCAN, None)}
  if bad:
    raise ValueError(f"layouts {bad}: expected {LOOP!r}, {SCAN!r} or None")
  if stack:
    tree = stack_layers(tree, stack)
  if unstack:
    tree = unstack_layers(tree, unstack)
  return tree


def to_model_layout(tree, mcfg):
  """``tree`` (either layout, per tower) in the layout of the ``ClinVLAConfig`` ``mcfg``."""
  return to_layouts(tree, model_layouts(mcfg))
