"""Orbax checkpoints of the trainable state only.

A checkpoint holds the trainable parameters, their optimizer state and the
step (item "state"), the Grain iterator state of every process (item
"data_iter") and the config (item "config").  The frozen backbone is never
saved: on restore it comes from its pretrained weights (or its deterministic
initialisation) and the trainable tree is merged into it.

Saves are asynchronous and atomic (Orbax writes to a temporary folder and
renames it when complete), so a process killed at any moment leaves either the
previous checkpoint or the new one, never a half-written one that looks
complete.  The last ``keep`` checkpoints are kept, plus the best by an
evaluation metric when one is configured.

A checkpoint can still be damaged after it was completed (a truncated copy,
a failing disk).  ``restore_latest_intact`` then says which step failed and
why, moves it to ``<workdir>/damaged_checkpoints/`` (nothing is deleted) and
resumes from the newest step that restores.  It never falls back to step 0
on its own: with no intact step left it raises.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers

STATE, DATA_ITER, CONFIG = "state", "data_iter", "config"


def _grain_checkpoint():
  # Imported on use: the training step and the benchmarks import this module,
  # and must also run on accelerator images that have Orbax but no Grain.
  import grain  # pylint: disable=g-import-not-at-top

  return grain.checkpoint


class IncompatibleCheckpointError(ValueError):
  """The checkpoint's trainable tree does not fit the current config."""


class NoIntactCheckpointError(RuntimeError):
  """Checkpoints exist, but none of them can be restored."""


def _preservation(keep: int, best_metric: str, best_mode: str):
  policies = [checkpoint_managers.LatestN(n=keep)]
  if best_metric:
    sign = 1.0 if best_mode == "max" else -1.0
    policies.append(
      checkpoint_managers.BestN(
        get_metric_fn=lambda metrics: sign * float(metrics[best_metric]),
        reverse=False,
        n=1,
        keep_checkpoints_without_metrics=False,
      )
    )
  return checkpoint_managers.AnyPreservationPolicy(policies)


class Checkpointer:
  """CheckpointManager over ``workdir/checkpoints`` with the three items above."""

  def __init__(
    self, workdir: str, *, keep: int = 3, best_metric: str = "", best_mode: str = "max", async_save: bool = True
  ):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(
      preservation_policy=_preservation(keep, best_metric, best_mode),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=True,
      create=True,
    )
    self.manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE: ocp.StandardCheckpointHandler(),
        DATA_ITER: _grain_checkpoint().CheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
      },
    )
    self.best_metric = best_metric

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> List[int]:
    return sorted(self.manager.all_steps())

  def save(
    self,
    step: int,
    state: Dict[str, Any],
    data_iter,
    config_dict: Dict[str, Any],
    metrics: Optional[Dict[str, float]] = None,
    *,
    force: bool = False,
  ) -> bool:
    """Starts an (asynchronous) save; ``data_iter=None`` saves no data position."""
    if metrics is not None and self.best_metric and self.best_metric not in metrics:
      metrics = None
    items = {STATE: ocp.args.StandardSave(state), CONFIG: ocp.args.JsonSave(config_dict)}
    if data_iter is not None:
      items[DATA_ITER] = _grain_checkpoint().CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

  def _saved_shapes(self, step: int) -> Optional[Dict[str, tuple]]:
    try:
      meta = self.manager.item_metadata(step)[STATE]
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("could not read checkpoint metadata at step %d: %s", step, e)
      return None
    return _shapes(meta)

  def _check_compatible(self, step: int, abstract_state, saved: Optional[Dict[str, tuple]]) -> None:
    wanted = _shapes(abstract_state)
    if saved is None:
      return
    missing = sorted(set(wanted) - set(saved))
    unexpected = sorted(set(saved) - set(wanted))
    mismatched = sorted(
      f"{k}: checkpoint {saved[k]}, config {wanted[k]}" for k in set(saved) & set(wanted) if saved[k] != wanted[k]
    )
    if missing or unexpected or mismatched:
      lines = [f"checkpoint {self.directory}/{step} does not fit this config:"]
      if mismatched:
        lines.append("  shape mismatches:\n    " + "\n    ".join(mismatched[:20]))
      if missing:
        lines.append(f"  missing from the checkpoint ({len(missing)}): {missing[:10]}")
      if unexpected:
        lines.append(f"  not in this config ({len(unexpected)}): {unexpected[:10]}")
      lines.append("  Use the config it was trained with, or a fresh --workdir.")
      raise IncompatibleCheckpointError("\n".join(lines))

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restores (state, data_iter) at ``step`` into the shardings of ``abstract_state``.

    The block layout (``scan_layers``) is not part of what must fit: a state
    saved in the loop layout restores into a scan-layout ``abstract_state`` and
    the other way round, per tower, converted after reading.
    """
    saved = self._saved_shapes(step)
    target, to_wanted = _in_saved_layout(abstract_state, saved)
    self._check_compatible(step, target, saved)
    items = {STATE: ocp.args.StandardRestore(target)}
    if data_iter is not None:
      items[DATA_ITER] = _grain_checkpoint().CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    state = restored[STATE]
    if to_wanted is not None:
      state = to_wanted(state)
    return state, (restored[DATA_ITER] if data_iter is not None else None)

  def restore_params(self, step: int, abstract_params):
    """The trainable parameters at ``step``, in the shardings (and block layout) of ``abstract_params``.

    For evaluation: no optimizer is needed. The step and optimizer state are read as they were saved (their
    metadata gives the target) and dropped; the parameters must fit ``abstract_params`` as in ``restore``.
    """
    try:
      meta = self.manager.item_metadata(step)[STATE]
    except Exception as e:  # pylint: disable=broad-except
      raise IncompatibleCheckpointError(f"{self.directory}/{step}: unreadable checkpoint metadata ({e})") from e
    if "params" not in meta:
      raise IncompatibleCheckpointError(f"{self.directory}/{step}: no trainable parameters in the checkpoint")
    saved = _shapes({"params": meta["params"]})
    target, to_wanted = _in_saved_layout({"params": abstract_params}, saved)
    self._check_compatible(step, target, saved)
    replicated = _first_sharding(abstract_params)
    as_saved = jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=replicated),
      {k: v for k, v in meta.items() if k != "params"},
    )
    restored = self.manager.restore(
      step, args=ocp.args.Composite(**{STATE: ocp.args.StandardRestore({**as_saved, **target})})
    )[STATE]
    params = {"params": restored["params"]}
    return (to_wanted(params) if to_wanted is not None else params)["params"]

  def restore_latest_intact(self, abstract_state, data_iter=None) -> Tuple[Any, Any, Optional[int]]:
    """(state, data_iter, step) from the newest step that restores; (None, data_iter, None) if none exist.

    A step that fails to restore is reported, set aside and skipped.  A
    checkpoint that does not fit the config is not damage: that error stands.
    """
    failures = []
    for step in reversed(self.all_steps()):
      try:
        state, restored_iter = self.restore(step, abstract_state, data_iter)
      except IncompatibleCheckpointError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        failures.append(f"step {step}: {reason}")
        moved = self._set_aside(step)
        # The console gets the printed warning; the log file gets the details once, not a second console line.
        logging.info(
          "checkpoint step %d in %s cannot be restored (%s); moved to %s, trying the step before it",
          step,
          self.directory,
          reason,
          moved,
        )
        print(
          f"WARNING: checkpoint step {step} cannot be restored ({reason}); moved to {moved}. "
          f"Trying the step before it.",
          flush=True,
        )
        continue
      if failures:
        print(
          f"WARNING: resuming from step {step}, the newest intact checkpoint; "
          f"{len(failures)} newer one(s) were damaged",
          flush=True,
        )
      return state, restored_iter, step
    if failures:
      raise NoIntactCheckpointError(
        f"no checkpoint in {self.directory} can be restored:\n  "
        + "\n  ".join(failures)
        + f"\nThe damaged steps are in {os.path.join(self.workdir, 'damaged_checkpoints')}. "
        "Training does not start again from step 0 by itself: move them back or away, or use a fresh --workdir."
      )
    return None, data_iter, None

  def _set_aside(self, step: int) -> str:
    """Moves a damaged step out of Orbax's sight, so that a later save of the same step does not collide."""
    source = os.path.join(self.directory, str(step))
    target = os.path.join(self.workdir, "damaged_checkpoints", f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0 and os.path.isdir(source):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(source, target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      multihost_utils.sync_global_devices(f"clinvla_checkpoint_set_aside_{step}")
    self.manager.reload()
    return target

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def _in_saved_layout(abstract_state, saved: Optional[Dict[str, tuple]]):
  """(restore target, convert back or None): ``abstract_state`` in the block layout the checkpoint was saved in.

  Each tower's layout is read from the saved paths (``image_tower/blocks_0/...``
  or ``image_tower/blocks/...``); a tower without block parameters in either
  tree needs nothing.  The conversion back runs under jit into the shardings
  of ``abstract_state``.
  """
  from clinvla_jax.convert import layout  # pylint: disable=g-import-not-at-top

  if saved is None:
    return abstract_state, None
  try:
    saved_layouts = layout.path_layouts(saved)
  except ValueError:
    return abstract_state, None  # not a tree of ours; the shape check reports it
  wanted_layouts = layout.layer_layouts(abstract_state)
  differ = {
    tower: kind
    for tower, kind in saved_layouts.items()
    if kind and wanted_layouts[tower] and kind != wanted_layouts[tower]
  }
  if not differ:
    return abstract_state, None
  try:
    target = layout.to_layouts(abstract_state, differ)
  except ValueError as e:
    # Not damage: restore_latest_intact must not set such a checkpoint aside.
    raise IncompatibleCheckpointError(f"cannot read blocks saved in the {differ} layout into this config: {e}") from e
  back = {tower: wanted_layouts[tower] for tower in differ}
  logging.info("checkpoint blocks in the %s layout; converting to %s", differ, back)
  if all(getattr(x, "sharding", None) is not None for x in jax.tree_util.tree_leaves(abstract_state)):
    shardings = jax.tree_util.tree_map(lambda x: x.sharding, abstract_state)
    convert = jax.jit(lambda tree: layout.to_layouts(tree, back), out_shardings=shardings)
  else:
    convert = jax.jit(lambda tree: layout.to_layouts(tree, back))
  return target, convert


def _first_sharding(abstract_tree) -> jax.sharding.Sharding:
  """Replicated over the mesh ``abstract_tree`` is sharded on (one device when it carries no sharding)."""
  for leaf in jax.tree_util.tree_leaves(abstract_tree):
    mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
    if mesh is not None:
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def _shapes(tree) -> Optional[Dict[str, tuple]]:
  flat = {}
  try:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
  except Exception:  # pylint: disable=broad-except
    return None
  for path, leaf in leaves:
    shape = getattr(leaf, "shape", None)
    if shape is None:
      continue
    # Dict keys, attribute names (optax states) and indices print alike, so saved
    # metadata and live trees compare by the same path.
    flat[jax.tree_util.keystr(path, simple=True, separator="/")] = tuple(shape)
  return flat


def checkpoint_bytes(state) -> int:
  return int(
    sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree_util.tree_leaves(state) if hasattr(x, "shape"))
  )
