"""Loading configs (Python files with ``get_config()``) with dotted overrides, and checking them.

``validate`` checks a config before anything is built: the range of every numeric field and the rules between
fields (a head count that divides the hidden size, ...).  A broken rule raises ``ConfigError`` naming the field,
the value given and the rule; ``load_config`` and the command line (exit status 2) call it.  The batch's
divisibility by the data-parallel size needs the device count, so ``sharding.check_batch_divides`` checks it
where the mesh is built.
"""

from __future__ import annotations

import ast
import importlib.util
import math
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


class ConfigError(ValueError):
  """Config fields that break their rules; ``problems`` holds one "field = value: rule" line each."""

  def __init__(self, problems):
    self.problems = list(problems)
    super().__init__("invalid config:\n  " + "\n  ".join(self.problems))


def problem(field: str, value: Any, rule: str) -> str:
  return f"{field} = {value!r}: {rule}"


_TRUE, _FALSE = ("true", "t", "1", "yes"), ("false", "f", "0", "no")


def _type_name(current: Any) -> str:
  for kind, name in ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string")):
    if isinstance(current, kind):
      return name
  return "a tuple" if isinstance(current, (tuple, list)) else type(current).__name__


def _coerce(value: Any, current: Any) -> Any:
  """``value`` as the type of the field's ``current`` value (strings parsed as the command line does); else raises."""
  if current is None or value is None:  # ConfigDict lets any field be None
    return _literal(value) if isinstance(value, str) else value
  if isinstance(value, str) and not isinstance(current, str):
    if isinstance(current, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError
      return value.lower() in _TRUE
    value = _literal(value)
  if isinstance(current, bool) or isinstance(value, bool):
    ok = isinstance(current, bool) and isinstance(value, bool)
  elif isinstance(current, int):
    ok = isinstance(value, int)
  elif isinstance(current, float):
    ok = isinstance(value, (int, float))
    value = float(value) if ok else value
  elif isinstance(current, (tuple, list)):
    ok = isinstance(value, (tuple, list))
  else:
    ok = isinstance(value, type(current))
  if not ok:
    raise ValueError
  return value


def _literal(value: str) -> Any:
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def _override_target(config: ml_collections.ConfigDict, key: str):
  """(the ConfigDict holding ``key``'s last part, that part); raises ConfigError for an unknown field."""
  node = config
  parts = key.split(".")
  for depth, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      where = ".".join(parts[: depth + 1])
      raise ConfigError([f"{where}: no such field" + (f" (known: {', '.join(known)})" if known else "")])
    if depth < len(parts) - 1:
      node = node[part]
  if isinstance(node[parts[-1]], ml_collections.ConfigDict):
    raise ConfigError([f"{key}: a group of fields; override its fields one by one ({key}.<field>=...)"])
  return node, parts[-1]


def coerce_override(config: ml_collections.ConfigDict, key: str, value: Any) -> Any:
  """``value`` converted to the type of field ``key``; ConfigError naming the field, the value and the type."""
  node, name = _override_target(config, key)
  try:
    return _coerce(value, node[name])
  except ValueError:
    raise ConfigError([problem(key, value, f"must be {_type_name(node[name])}, like its default {node[name]!r}")])


def check_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> list:
  """Problems (strings) of ``{"train.num_steps": "10", ...}`` against the config's fields and their types."""
  problems = []
  for key, value in overrides.items():
    try:
      coerce_override(config, key, value)
    except ConfigError as e:
      problems.extend(e.problems)
  return problems


def apply_overrides(config: ml_collections.ConfigDict, overrides: Optional[Mapping[str, Any]]):
  """Sets ``{"model.text.num_layers": 6, ...}`` on the config, checking every key exists and every value's type."""
  problems = check_overrides(config, overrides or {})
  if problems:
    raise ConfigError(problems)
  for key, value in (overrides or {}).items():
    node, name = _override_target(config, key)
    node[name] = coerce_override(config, key, value)
  return config


def _number(field, value, rule, test, integer=False):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
    return problem(field, value, f"must be {'an integer' if integer else 'a number'} {rule}")
  if not math.isfinite(value) or not test(value):
    return problem(field, value, f"must be {rule}")
  return None


# (field, rule, test, integer).  A field a config lacks is not checked (configs of older versions).
_AT_LEAST_1 = (">= 1", lambda v: v >= 1, True)
_AT_LEAST_0 = (">= 0", lambda v: v >= 0, True)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0, False)
_POSITIVE = ("> 0", lambda v: v > 0, False)
_FRACTION = ("in [0, 1)", lambda v: 0 <= v < 1, False)
_TOWER_DIMS = ("hidden_size", "num_heads", "mlp_dim")
RANGES = (
  *[(f, *_AT_LEAST_1) for f in ("train.num_steps", "train.log_every_steps", "train.checkpoint_every_steps")],
  *[(f, *_AT_LEAST_1) for f in ("train.keep_checkpoints", "optim.batch_size", "eval.batch_size", "loss.chunk_size")],
  *[(f, *_AT_LEAST_1) for f in ("model.proj_dim", "data.max_text_len")],
  *[(f"model.{t}.{d}", *_AT_LEAST_1) for t in ("image", "text") for d in _TOWER_DIMS],
  *[(f"model.image.{d}", *_AT_LEAST_1) for d in ("patch_size", "image_size", "channels")],
  *[(f"model.text.{d}", *_AT_LEAST_1) for d in ("vocab_size", "type_vocab_size")],
  # A cut report keeps its [CLS] and ends on its [SEP] (records.fit_token_length).
  ("model.text.max_len", ">= 2", lambda v: v >= 2, True),
  *[(f, *_AT_LEAST_0) for f in ("train.data_workers", "train.prefetch_to_device", "optim.warmup_steps", "seed")],
  # No layers is legal: the tests compare a tower's embeddings without blocks.
  *[(f"model.{t}.{d}", *_AT_LEAST_0) for t in ("image", "text") for d in ("adapter_dim", "num_layers")],
  *[(f, *_NON_NEGATIVE) for f in ("optim.weight_decay", "optim.grad_clip_norm", "train.peak_flops_per_device")],
  ("loss.local_weight", *_NON_NEGATIVE),
  *[(f, *_POSITIVE) for f in ("optim.eps", "loss.max_logit_scale", "model.image.pixel_std")],
  *[(f"model.{t}.layer_norm_eps", *_POSITIVE) for t in ("image", "text")],
  ("optim.min_lr_ratio", "in [0, 1]", lambda v: 0 <= v <= 1, False),
  *[(f, *_FRACTION) for f in ("optim.b1", "optim.b2", "data.mask_ratio")],
  *[(f"model.text.{d}", *_FRACTION) for d in ("dropout", "attention_dropout")],
)
CHOICES = (
  ("train.best_mode", ("max", "min")),
  ("train.transfer_guard", ("allow", "log", "disallow")),
  ("eval.views", ("frontal", "all")),
  ("loss.global_type", ("infonce", "sigmoid", "cosine")),
  ("loss.local_type", ("gloria", "cosine")),
)
_MISSING = object()


def _get(config, field: str, default=_MISSING):
  node = config
  for part in field.split("."):
    if not hasattr(node, "keys") or part not in node:
      return default
    node = node[part]
  return node


def _augment_problems(augment_cfg) -> list:
  from clinvla_jax.data import augment  # pylint: disable=g-import-not-at-top

  try:
    augment.AugmentSpec.from_config(augment_cfg)
  except (ValueError, TypeError) as e:
    return [str(e)]
  return []


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every rule a config must keep before a model is built; raises ConfigError listing each broken one."""
  from clinvla_jax.data import schema  # pylint: disable=g-import-not-at-top

  problems = []
  for field, rule, test, integer in RANGES:
    value = _get(config, field)
    if value is not _MISSING:
      problems.append(_number(field, value, rule, test, integer))
  for name, rate in (_get(config, "optim.learning_rates", None) or {}).items():
    problems.append(_number(f"optim.learning_rates.{name}", rate, ">= 0", lambda v: v >= 0))
  for i, t in enumerate(_get(config, "model.local_temperatures", None) or ()):
    problems.append(_number(f"model.local_temperatures[{i}]", t, "> 0", lambda v: v > 0))
  for field, choices in CHOICES:
    value = _get(config, field)
    if value is not _MISSING and value not in choices:
      problems.append(problem(field, value, f"must be one of {', '.join(choices)}"))
  problems.extend(_mesh_problems(_get(config, "mesh", None)))
  problems.extend(_text_bucket_problems(_get(config, "eval.text_buckets", None)))
  problems.extend(_augment_problems(_get(config, "data.augment", None)))
  problems = [p for p in problems if p]
  if not problems:  # the rules between fields assume each field is in range
    problems = _cross_field_problems(config, schema.MAX_TEXT_LEN)
  if problems:
    raise ConfigError(problems)
  return config


def _mesh_problems(mesh) -> list:
  if mesh is None:
    return []
  problems = [
    problem(f"mesh.{axis}", size, "must be an integer >= 1, or -1 (all remaining devices)")
    for axis, size in mesh.items()
    if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1)
  ]
  if list(mesh.values()).count(-1) > 1:
    problems.append(problem("mesh", dict(mesh), "at most one axis may be -1 (all remaining devices)"))
  return problems


def _text_bucket_problems(buckets) -> list:
  # Lengths at or above the text tower's input width are allowed and change nothing (those texts run at full
  # length), so one setting serves every model.text.max_len.
  if buckets is None:
    return []
  field = "eval.text_buckets"
  if not isinstance(buckets, (tuple, list)):
    return [problem(field, buckets, "must be a tuple of token lengths, e.g. (32, 64, 96), or () for none")]
  if any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in buckets):
    return [problem(field, tuple(buckets), "must hold integers >= 1")]
  if any(a >= b for a, b in zip(buckets, buckets[1:])):
    return [problem(field, tuple(buckets), "must be increasing, each length once")]
  return []


def _cross_field_problems(config, record_text_len: int) -> list:
  problems = []
  for tower in ("image", "text"):
    hidden, heads = _get(config, f"model.{tower}.hidden_size", None), _get(config, f"model.{tower}.num_heads", None)
    if hidden is not None and heads is not None and hidden % heads:
      problems.append(
        problem(f"model.{tower}.hidden_size", hidden, f"must be divisible by model.{tower}.num_heads = {heads}")
      )
  image, patch = _get(config, "model.image.image_size", None), _get(config, "model.image.patch_size", None)
  if image is not None and patch is not None and image % patch:
    problems.append(problem("model.image.image_size", image, f"must be divisible by model.image.patch_size = {patch}"))
  # Not checked against model.text.max_len: a text tower with a shorter position table reads the first
  # model.text.max_len tokens of a record (train.fit_text_length), as evaluation does.
  text_len = _get(config, "data.max_text_len", None)
  if text_len is not None and text_len > record_text_len:
    problems.append(problem("data.max_text_len", text_len, f"must be <= {record_text_len} (tokens a record holds)"))
  return problems


def load_config(
  path: str, overrides: Optional[Mapping[str, Any]] = None, *, check: bool = True
) -> ml_collections.ConfigDict:
  """Loads ``configs/<name>.py`` (``path:arg`` passes ``arg`` to ``get_config``) and applies overrides.

  The one loader of config files, for the Python API and the command line (``--config``).  ``check``: validate the
  result (`validate`); the command line checks once its --config.<field> overrides are applied.
  """
  arg = None
  if ":" in os.path.basename(path):
    path, arg = path.rsplit(":", 1)
  module = _import_config_module(path)
  config = module.get_config(arg) if arg is not None else module.get_config()
  config = apply_overrides(config, overrides)
  return validate(config) if check else config
