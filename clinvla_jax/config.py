"""Loading configs (Python files with ``get_config()``) with dotted overrides."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any, Mapping, Optional

import ml_collections


def _import_config_module(path: str):
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file not found: {path}")
  # Config files may import their siblings (`from configs import base`): make
  # the folder above `configs/` importable.
  parent = os.path.dirname(os.path.dirname(path))
  if parent not in sys.path:
    sys.path.insert(0, parent)
  name = "_clinvla_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _parse_value(value: Any, current: Any) -> Any:
  if not isinstance(value, str) or isinstance(current, str):
    return value
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Optional[Mapping[str, Any]]):
  """Sets ``{"model.text.num_layers": 6, ...}`` on the config, checking every key exists."""
  for key, value in (overrides or {}).items():
    node = config
    parts = key.split(".")
    for part in parts[:-1]:
      if part not in node:
        raise KeyError(f"config override {key!r}: no field {part!r}")
      node = node[part]
    if parts[-1] not in node:
      raise KeyError(f"config override {key!r}: no field {parts[-1]!r} (known: {sorted(node.keys())})")
    node[parts[-1]] = _parse_value(value, node[parts[-1]])
  return config


def load_config(path: str, overrides: Optional[Mapping[str, Any]] = None) -> ml_collections.ConfigDict:
  """Loads ``configs/<name>.py`` (``path:arg`` passes ``arg`` to ``get_config``) and applies overrides."""
  arg = None
  if ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  module = _import_config_module(path)
  config = module.get_config(arg) if arg is not None else module.get_config()
  return apply_overrides(config, overrides)
