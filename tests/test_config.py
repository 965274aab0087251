"""Each model default lives in one place: the model's dataclasses; the base config reads them."""

import dataclasses

from clinvla_jax import api
from clinvla_jax.config import load_config
from clinvla_jax.model import layers
from clinvla_jax.model.clinvla import ClinVLAConfig
from configs import base

# Resolved when the model is built (per backend), so not copied from the dataclass defaults.
RESOLVED = {"precision", "residual_grad_barrier"}


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = tuple(value) if isinstance(value, (list, tuple)) else value
  return out


def test_base_model_config_is_the_dataclass_defaults():
  from_dataclass = _flat(dataclasses.asdict(ClinVLAConfig()))
  from_config = _flat(base.get_model_config().to_dict())
  shared = set(from_dataclass) & set(from_config)
  assert {k: (from_dataclass[k], from_config[k]) for k in shared if from_dataclass[k] != from_config[k]} == {}
  # Nothing only in one of them, except what is resolved at build time or set by the loss config.
  only_config = {k for k in set(from_config) - shared if k.split(".")[-1] not in RESOLVED}
  only_dataclass = {
    k for k in set(from_dataclass) - shared if k.split(".")[-1] not in RESOLVED and k != "logit_bias_init"
  }
  assert only_config == set() and only_dataclass == set()


def test_building_the_base_config_changes_only_resolved_fields():
  built = api.model_config(load_config("configs/base.py"))
  default = ClinVLAConfig()
  for tower in ("image", "text"):
    b, d = getattr(built, tower), getattr(default, tower)
    changed = {f.name for f in dataclasses.fields(d) if getattr(b, f.name) != getattr(d, f.name)}
    assert changed <= RESOLVED, changed
    assert b.precision == layers.auto_precision_name()
  assert dataclasses.replace(built, image=default.image, text=default.text) == default
