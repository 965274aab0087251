"""The weights to evaluate, embed or index with: a checkpoint's trainable tree over the frozen backbone, or the
weights before any training.

A checkpoint holds only the trainable parameters (``clinvla_jax.checkpoint``); the frozen backbone comes from its
pretrained weights (``config.init``) or its seeded initialisation, exactly as training built it. Nothing here needs
the optimizer, the train step or the loss, so evaluation, embedding and the search index never build a trainer.
"""

import os
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax

from clinvla_jax import api
from clinvla_jax import optim
from clinvla_jax import sharding
from clinvla_jax.checkpoint import Checkpointer
from clinvla_jax.convert import pretrained


def checkpoint_location(path: str) -> Tuple[str, Optional[int]]:
  """(workdir, step) from a workdir, its checkpoints/ folder, or one checkpoints/<step> folder."""
  path = os.path.abspath(path)
  step = None
  if os.path.basename(path).isdigit() and os.path.basename(os.path.dirname(path)) == "checkpoints":
    step = int(os.path.basename(path))
    path = os.path.dirname(path)
  if os.path.basename(path) == "checkpoints":
    path = os.path.dirname(path)
  return path, step


def initial_variables(config) -> Dict[str, Any]:
  """The weights before any training: the seeded init, then the pretrained towers of ``config.init``."""
  variables = api.init_params(config, jax.random.key(int(config.seed)))
  return pretrained.load_configured_weights(variables, config)


def abstract_trainable_params(config, mesh: Optional[jax.sharding.Mesh] = None):
  """The trainable subtree of ``config``'s parameters as sharded ShapeDtypeStructs (what a checkpoint holds)."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  boxed = api.abstract_params(config)["params"]
  shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules(config))
  abstract = jax.tree_util.tree_map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.meta.unbox(boxed), shardings
  )
  trainable, _ = optim.split_params(abstract, list(config.optim.param_groups))
  return trainable


def restore_variables(config, checkpoint: str, step: Optional[int] = None) -> Tuple[Dict[str, Any], int]:
  """Full variables for evaluation: the frozen backbone (pretrained or seeded init) + a checkpoint's trainable tree."""
  workdir, path_step = checkpoint_location(checkpoint)
  step = step if step is not None else path_step
  checkpointer = Checkpointer(workdir, async_save=False)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {checkpointer.directory}")
    trainable = checkpointer.restore_params(step, abstract_trainable_params(config))
  finally:
    checkpointer.close()
  rules = list(config.optim.param_groups)
  _, frozen = optim.split_params(initial_variables(config)["params"], rules)
  return {"params": optim.merge_params(trainable, frozen)}, int(step)


def evaluation_variables(config, checkpoint: Optional[str] = None) -> Tuple[Dict[str, Any], Optional[int]]:
  """(variables, step) to evaluate, embed or index with: a checkpoint's (`restore_variables`), else
  `initial_variables` with step None."""
  if checkpoint:
    return restore_variables(config, checkpoint)
  return initial_variables(config), None
