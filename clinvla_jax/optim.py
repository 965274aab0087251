"""Path rules: which parameters train, in which learning-rate group.

A parameter's path is its keys joined by "/" (e.g.
"text_tower/layer_3/language_adapter/down/kernel").  ``config.optim.param_groups``
is an ordered list of (regex, group); the first full match wins; the group
"frozen" is not differentiated and has no optimizer state.

With ``scan_layers`` a tower's blocks are one stacked subtree
("text_tower/layer/language_adapter/down/kernel", every layer along the
leading axis), so a rule sees all blocks at once: rules that pick out single
blocks by number only apply to the loop layout.
"""

from __future__ import annotations

import math
import re
from typing import Dict, Sequence, Tuple

import jax
import optax
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
    counts[label] = counts.get(label, 0) + math.prod(leaf.shape)
  missing = sorted(g for g in counts if g != FROZEN and g not in learning_rates)
  if missing:
    raise ValueError(f"groups {missing} have no entry in config.optim.learning_rates")
  return counts


def flat_paths(params) -> Dict[str, object]:
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}


def split_params(params, rules) -> Tuple[dict, dict]:
  """(trainable, frozen) nested dicts holding disjoint leaves of ``params``."""
  flat = traverse_util.flatten_dict(params)
  trainable, frozen = {}, {}
  for path, leaf in flat.items():
    (frozen if group_of("/".join(path), rules) == FROZEN else trainable)[path] = leaf
  return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge_params(trainable, frozen) -> dict:
  flat = dict(traverse_util.flatten_dict(frozen))
  for path, leaf in traverse_util.flatten_dict(trainable).items():
    if path in flat:
      raise ValueError(f"parameter {'/'.join(path)} is both trainable and frozen")
    flat[path] = leaf
  return traverse_util.unflatten_dict(flat)


def learning_rate_schedules(optim_cfg, num_steps: int) -> Dict[str, object]:
  """Linear warm-up to each group's rate, then cosine decay to min_lr_ratio of it."""
  schedules = {}
  warmup = min(int(optim_cfg.warmup_steps), max(num_steps - 1, 0))
  for group, peak in optim_cfg.learning_rates.items():
    schedules[group] = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=float(peak),
      warmup_steps=warmup,
      decay_steps=max(num_steps, warmup + 1),
      end_value=float(peak) * float(optim_cfg.min_lr_ratio),
    )
  return schedules


def make_optimizer(optim_cfg, trainable_params, rules, num_steps: int):
  """AdamW per learning-rate group after global-norm clipping.

  The frozen group never reaches the optimizer (its parameters are not in
  ``trainable_params``), so it has no optimizer state at all.
  Returns (optax transformation, {group: schedule}).
  """
  labels = param_labels(trainable_params, rules)
  groups = sorted(set(jax.tree_util.tree_leaves(labels)))
  missing = [g for g in groups if g not in optim_cfg.learning_rates]
  if missing:
    raise ValueError(f"groups {missing} have no entry in config.optim.learning_rates")
  schedules = learning_rate_schedules(optim_cfg, num_steps)
  transforms = {
    g: optax.adamw(
      schedules[g], b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay
    )
    for g in groups
  }
  chain = []
  if optim_cfg.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain), {g: schedules[g] for g in groups}
