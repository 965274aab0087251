"""Path rules: which parameters train, in which learning-rate group.

A parameter's path is its keys joined by "/" (e.g.
"text_tower/layer_3/language_adapter/down/kernel").  ``config.optim.param_groups``
is an ordered list of (regex, group); the first full match wins; the group
"frozen" is not differentiated and has no optimizer state.
"""

from __future__ import annotations

import re
from typing import Dict, Sequence, Tuple

import jax
from flax import traverse_util

FROZEN = "frozen"


def param_path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def group_of(path: str, rules: Sequence[Tuple[str, str]]) -> str:
  for pattern, group in rules:
    if re.fullmatch(pattern, path):
      return group
  raise ValueError(f"parameter {path!r} matches no rule in config.optim.param_groups")


def param_labels(params, rules: Sequence[Tuple[str, str]]):
  """Tree of group names with the structure of ``params`` (fails on an uncovered parameter)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: group_of(param_path(p), rules), params)


def check_rules(params, rules, learning_rates) -> Dict[str, int]:
  """Every parameter covered, every non-frozen group has a learning rate; returns counts per group."""
  labels = param_labels(params, rules)
  counts: Dict[str, int] = {}
  for label, leaf in zip(jax.tree_util.tree_leaves(labels), jax.tree_util.tree_leaves(params)):
    counts[label] = counts.get(label, 0) + int(getattr(leaf, "size", 0) or _size(leaf))
  missing = sorted(g for g in counts if g != FROZEN and g not in learning_rates)
  if missing:
    raise ValueError(f"groups {missing} have no entry in config.optim.learning_rates")
  return counts


def _size(leaf) -> int:
  n = 1
  for d in leaf.shape:
    n *= d
  return n


def flat_paths(params) -> Dict[str, object]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}
