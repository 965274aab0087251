"""Each model default lives in one place: the model's dataclasses; the base config reads them."""

import dataclasses
import pathlib

import pytest

import tiny_runs

from clinvla_jax import api, sharding
from clinvla_jax.config import ConfigError, load_config, validate
from clinvla_jax.model import layers
from clinvla_jax.model.clinvla import ClinVLAConfig
from configs import base

# Resolved when the model is built (per backend), so not copied from the dataclass defaults.
RESOLVED = {"precision", "residual_grad_barrier"}
REPO = pathlib.Path(__file__).resolve().parents[1]


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


# Every rule a config is checked against when it is loaded: (overrides, the message's line).
BAD = [
  ({"train.num_steps": -5}, "train.num_steps = -5: must be >= 1"),
  ({"train.num_steps": 0}, "train.num_steps = 0: must be >= 1"),
  ({"train.log_every_steps": 0}, "train.log_every_steps = 0: must be >= 1"),
  ({"train.checkpoint_every_steps": -1}, "train.checkpoint_every_steps = -1: must be >= 1"),
  ({"train.keep_checkpoints": 0}, "train.keep_checkpoints = 0: must be >= 1"),
  ({"train.data_workers": -1}, "train.data_workers = -1: must be >= 0"),
  ({"train.prefetch_to_device": -2}, "train.prefetch_to_device = -2: must be >= 0"),
  ({"train.peak_flops_per_device": -1.0}, "train.peak_flops_per_device = -1.0: must be >= 0"),
  ({"train.best_mode": "largest"}, "train.best_mode = 'largest': must be one of max, min"),
  ({"train.transfer_guard": "deny"}, "train.transfer_guard = 'deny': must be one of allow, log, disallow"),
  ({"optim.batch_size": 0}, "optim.batch_size = 0: must be >= 1"),
  ({"eval.batch_size": -8}, "eval.batch_size = -8: must be >= 1"),
  ({"eval.views": "lateral"}, "eval.views = 'lateral': must be one of frontal, all"),
  ({"optim.learning_rates.task_adapters": -1e-4}, "optim.learning_rates.task_adapters = -0.0001: must be >= 0"),
  ({"optim.learning_rates.other_trainable": float("nan")}, "optim.learning_rates.other_trainable = nan: must be >= 0"),
  ({"optim.weight_decay": -0.1}, "optim.weight_decay = -0.1: must be >= 0"),
  ({"optim.warmup_steps": -1}, "optim.warmup_steps = -1: must be >= 0"),
  ({"optim.min_lr_ratio": 1.5}, "optim.min_lr_ratio = 1.5: must be in [0, 1]"),
  ({"optim.grad_clip_norm": -1.0}, "optim.grad_clip_norm = -1.0: must be >= 0"),
  ({"optim.b1": 1.0}, "optim.b1 = 1.0: must be in [0, 1)"),
  ({"optim.b2": -0.5}, "optim.b2 = -0.5: must be in [0, 1)"),
  ({"optim.eps": 0.0}, "optim.eps = 0.0: must be > 0"),
  ({"data.mask_ratio": 1.0}, "data.mask_ratio = 1.0: must be in [0, 1)"),
  ({"data.mask_ratio": -0.25}, "data.mask_ratio = -0.25: must be in [0, 1)"),
  ({"data.max_text_len": 0}, "data.max_text_len = 0: must be >= 1"),
  ({"loss.local_weight": -0.8}, "loss.local_weight = -0.8: must be >= 0"),
  ({"loss.max_logit_scale": 0.0}, "loss.max_logit_scale = 0.0: must be > 0"),
  ({"loss.chunk_size": 0}, "loss.chunk_size = 0: must be >= 1"),
  ({"loss.global_type": "clip"}, "loss.global_type = 'clip': must be one of infonce, sigmoid, cosine"),
  ({"model.proj_dim": 0}, "model.proj_dim = 0: must be >= 1"),
  ({"model.text.num_layers": -1}, "model.text.num_layers = -1: must be >= 0"),
  ({"model.image.hidden_size": -64}, "model.image.hidden_size = -64: must be >= 1"),
  ({"model.image.num_heads": 0}, "model.image.num_heads = 0: must be >= 1"),
  ({"model.text.mlp_dim": 0}, "model.text.mlp_dim = 0: must be >= 1"),
  ({"model.image.adapter_dim": -16}, "model.image.adapter_dim = -16: must be >= 0"),
  ({"model.image.patch_size": 0}, "model.image.patch_size = 0: must be >= 1"),
  ({"model.text.vocab_size": 0}, "model.text.vocab_size = 0: must be >= 1"),
  ({"model.text.dropout": 1.0}, "model.text.dropout = 1.0: must be in [0, 1)"),
  ({"model.text.layer_norm_eps": 0.0}, "model.text.layer_norm_eps = 0.0: must be > 0"),
  ({"model.image.pixel_std": 0.0}, "model.image.pixel_std = 0.0: must be > 0"),
  ({"model.local_temperatures": (4.0, 0.0, 10.0)}, "model.local_temperatures[1] = 0.0: must be > 0"),
  ({"eval.text_buckets": (64, 32)}, "eval.text_buckets = (64, 32): must be increasing, each length once"),
  ({"eval.text_buckets": (0, 64)}, "eval.text_buckets = (0, 64): must hold integers >= 1"),
  ({"mesh.fsdp": 0}, "mesh.fsdp = 0: must be an integer >= 1, or -1 (all remaining devices)"),
  ({"mesh.fsdp": -1}, "mesh = {'data': -1, 'fsdp': -1, 'tensor': 1}: at most one axis may be -1"),
  # Rules between fields.
  ({"model.text.hidden_size": 30}, "model.text.hidden_size = 30: must be divisible by model.text.num_heads = 4"),
  ({"model.image.num_heads": 5}, "model.image.hidden_size = 64: must be divisible by model.image.num_heads = 5"),
  ({"model.image.image_size": 200}, "model.image.image_size = 200: must be divisible by model.image.patch_size = 16"),
  ({"data.max_text_len": 256}, "data.max_text_len = 256: must be <= 128 (tokens a record holds)"),
  ({"model.text.max_len": 1}, "model.text.max_len = 1: must be >= 2"),
  # Types and names of overrides.
  ({"train.num_steps": "abc"}, "train.num_steps = 'abc': must be an integer, like its default 50000"),
  ({"train.num_steps": 2.5}, "train.num_steps = 2.5: must be an integer"),
  ({"model.multiview": "maybe"}, "model.multiview = 'maybe': must be a boolean, like its default True"),
  ({"optim.b1": "high"}, "optim.b1 = 'high': must be a number, like its default 0.9"),
  ({"train.nmu_steps": 10}, "train.nmu_steps: no such field (known: best_metric, best_mode, "),
  ({"optim": 1}, "optim: a group of fields; override its fields one by one"),
]


@pytest.mark.parametrize(
  "overrides,message", BAD, ids=[next(iter(o)) + "=" + repr(next(iter(o.values()))) for o, _ in BAD]
)
def test_bad_config_values_are_refused_naming_field_value_and_rule(overrides, message):
  base = {"train.num_steps": 3}
  with pytest.raises(ConfigError) as e:
    load_config("configs/tiny.py", {**base, **overrides})
  assert message in str(e.value), str(e.value)
  assert len(e.value.problems) == 1, e.value.problems


@pytest.mark.parametrize("name", ["base", "tiny", "demo", "alta"])
def test_every_shipped_config_passes_the_checks(name):
  validate(load_config(f"configs/{name}.py"))


def test_overrides_from_strings_are_parsed_as_the_field_types():
  config = load_config("configs/tiny.py", {"train.num_steps": "7", "optim.b1": "0.5", "model.multiview": "false"})
  assert (config.train.num_steps, config.optim.b1, config.model.multiview) == (7, 0.5, False)
  assert load_config("configs/tiny.py", {"optim.eps": 1}).optim.eps == 1.0


@pytest.mark.multidevice
def test_batch_must_divide_over_the_data_parallel_axes():
  import jax

  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 1}, jax.devices()[:8])
  sharding.check_batch_divides(mesh, 8)
  with pytest.raises(
    ConfigError,
    match=r"optim.batch_size = 6: must be divisible by the data-parallel size "
    r"mesh.data = 4 x mesh.fsdp = 2 = 8",
  ):
    sharding.check_batch_divides(mesh, 6)
  with pytest.raises(ConfigError, match=r"mesh = \{'data': 3, 'fsdp': 1, 'tensor': 1\}: needs 3 devices, 8"):
    sharding.make_mesh({"data": 3, "fsdp": 1, "tensor": 1}, jax.devices()[:8])


# One process per refusal: the range check in the default tier, the rule, type and unknown-field
# refusals (each its own path through the flag parser) in the full tier.
@pytest.mark.parametrize(
  "extra, message",
  [
    ("--config.train.num_steps=-5", "train.num_steps = -5: must be >= 1"),
    pytest.param(
      "--config.model.text.hidden_size=30",
      "model.text.hidden_size = 30: must be divisible by model.text.num_heads",
      marks=pytest.mark.slow,
    ),
    pytest.param(
      "--config.train.num_steps=abc",
      "train.num_steps = 'abc': must be an integer, like its default 50000",
      marks=pytest.mark.slow,
    ),
    pytest.param("--config.train.nope=1", "train.nope: no such field", marks=pytest.mark.slow),
  ],
  ids=["range", "rule", "type", "unknown"],
)
def test_command_line_refuses_bad_values_with_status_2(extra, message):
  out = tiny_runs.cli("--mode=summary", extra, timeout=300)
  assert out.returncode == 2, (extra, out.stderr[-2000:])
  assert message in out.stderr and "Traceback" not in out.stderr, (extra, out.stderr[-2000:])
