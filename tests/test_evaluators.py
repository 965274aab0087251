"""Evaluators by name: config.evals, their options, cadences and the errors for the former flat keys."""

import ml_collections
import numpy as np
import pytest

from clinvla_jax import evaluate
from clinvla_jax import train
from clinvla_jax.evaluate import EmbeddingSet
from clinvla_jax.evaluate import evaluators
from clinvla_jax.evaluate import options
from configs import base
from configs import tiny


def _config(**evals):
  cfg = tiny.get_config()
  cfg.evals = ml_collections.ConfigDict()
  for name, spec in evals.items():
    cfg.evals[name] = spec
  return cfg


def test_base_lists_the_protocols_with_every_option_and_empty_paths():
  cfg = base.get_config()
  assert set(cfg.evals) == set(options.PROTOCOL_TYPES)
  for name, spec in cfg.evals.items():
    assert spec.type == name and spec.path == ""
    # Every option is in the config (so any can be set on the command line), at its one default.
    assert spec.to_dict() == options.option_fields(name)
  assert evaluators.build_evaluators(cfg) == {}  # no path: nothing runs


def test_numpy_level_defaults_are_the_options_defaults():
  assert evaluate.DEFAULT_CONFIG["rsna_folds"] == options.RsnaOptions.rsna_folds
  assert evaluate.DEFAULT_CONFIG["retrieval_ks"] == options.RetrievalOptions.retrieval_ks
  assert evaluate.DEFAULT_CONFIG["chexpert_5x200_ks"] == options.Chexpert5x200Options.chexpert_5x200_ks
  assert "path" not in evaluate.DEFAULT_CONFIG and "every_steps" not in evaluate.DEFAULT_CONFIG


@pytest.mark.parametrize(
  "key,value,new_form",
  [
    ("datasets", {"covid_cxr": {"path": "x"}}, 'config.evals.NAME = evaluator_options("retrieval"'),
    ("every_steps", 100, "config.evals.NAME.every_steps"),
    ("chexpert_8x200_lists", "/lists", "config.evals.chexpert_8x200.lists"),
    ("rsna", "/rsna", "config.evals.rsna.path"),
  ],
)
def test_former_flat_keys_fail_naming_the_new_form(key, value, new_form):
  cfg = _config()
  cfg.eval[key] = value
  with pytest.raises(ValueError, match=f"config.eval.{key} is no longer read; use ") as err:
    evaluators.build_evaluators(cfg)
  assert new_form in str(err.value)


def test_bad_specs_fail_clearly():
  with pytest.raises(ValueError, match="unknown evaluator type 'retrival'"):
    evaluators.build_evaluators(_config(a=dict(type="retrival", path="x")))
  with pytest.raises(ValueError, match="has no type"):
    evaluators.build_evaluators(_config(a=dict(path="x")))
  with pytest.raises(ValueError, match=r"config.evals.a \(type rsna\) has no option retrieval_ks"):
    evaluators.build_evaluators(_config(a=dict(type="rsna", path="x", retrieval_ks=(5,))))
  with pytest.raises(ValueError, match="the name 'rsna' is the rsna protocol's"):
    evaluators.build_evaluators(_config(rsna=options.evaluator_options("retrieval", path="x")))
  with pytest.raises(ValueError, match="has no option retrival_ks"):
    options.evaluator_options("retrieval", retrival_ks=(5,))
  cfg = _config(a=options.evaluator_options("retrieval", path="x"), b=options.evaluator_options("rsna"))
  with pytest.raises(ValueError, match=r"no evaluator b with a path"):
    evaluators.build_evaluators(cfg, names=["a", "b"])


def test_options_keep_config_order_types_and_tuples():
  cfg = _config(
    held_out=options.evaluator_options("retrieval", path="/d", split="val", every_steps=3, retrieval_ks=[5, 10]),
    rsna=options.evaluator_options("rsna", path="/r"),
  )
  built = evaluators.build_evaluators(cfg)
  assert list(built) == ["held_out", "rsna"]
  assert isinstance(built["held_out"], evaluators.RetrievalEvaluator)
  assert isinstance(built["rsna"], evaluators.RsnaEvaluator)
  assert built["held_out"].options.retrieval_ks == (5, 10)
  assert built["rsna"].options.split == "test" and built["rsna"].every_steps == 0
  assert [s for s in range(1, 10) if built["held_out"].due(s)] == [3, 6, 9]
  assert not any(built["rsna"].due(s) for s in range(1, 10))


def test_each_evaluator_has_its_own_cadence(monkeypatch):
  from clinvla_jax.evaluate import run as eval_run

  calls = []
  monkeypatch.setattr(eval_run, "run_evaluation", lambda config, v, outdir, predict_fn, names: calls.append(names))
  cfg = _config(
    cheap=options.evaluator_options("retrieval", path="/a", every_steps=2),
    rare=options.evaluator_options("retrieval", path="/b", every_steps=3),
    final_only=options.evaluator_options("retrieval", path="/c"),
  )
  assert train.eval_schedule(cfg) == {"cheap": 2, "rare": 3}
  due = train.periodic_evaluation(cfg, predict_fn=None)
  for step in range(1, 7):
    fn = due(step)
    if fn is not None:
      fn(None, f"eval/step_{step}")
  assert calls == [["cheap"], ["rare"], ["cheap"], ["cheap", "rare"]]  # steps 2, 3, 4, 6
  custom = train.periodic_evaluation(cfg, None, evaluate_fn=lambda v, o: {}, evaluate_every_steps=5)
  assert [s for s in range(1, 11) if custom(s) is not None] == [5, 10]


def test_scores_are_keyed_by_the_evaluator_name():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(40, 8))
  image /= np.linalg.norm(image, axis=1, keepdims=True)
  labels = np.arange(40) % 2

  def text_fn(texts):
    out = np.random.default_rng(len(texts)).normal(size=(len(texts), 8))
    return out / np.linalg.norm(out, axis=1, keepdims=True)

  cfg = _config(rsna_val=options.evaluator_options("rsna", path="/r", split="val", rsna_folds=2))
  rsna_val = evaluators.build_evaluators(cfg)["rsna_val"]
  scores = rsna_val.score(EmbeddingSet(image=image, labels=labels), text_fn)
  assert scores and all(k.startswith("rsna_val/zero_shot/") for k in scores)
  assert "rsna_val/zero_shot/AUC" in scores
  # The same scores as the numpy-level rsna scorer under its own name.
  direct = evaluate.run_evaluators(
    ["rsna"], {"rsna": EmbeddingSet(image=image, labels=labels)}, text_fn, {"rsna_folds": 2}
  )
  assert {k.replace("rsna/", "rsna_val/", 1): v for k, v in direct.items()} == scores


def test_former_flags_get_a_message_naming_the_new_form():
  msg = options.legacy_flag_error(["--config=configs/demo.py", "--config.eval.every_steps=5"])
  assert msg == (
    "--config.eval.every_steps is no longer read; use config.evals.NAME.every_steps "
    "(each evaluator has its own cadence) (see configs/base.py)"
  )
  assert "config.evals.rsna.path" in options.legacy_flag_error(["--config.eval.rsna", "/data"])
  assert options.legacy_flag_error(["--config.eval.batch_size=8", "--config.evals.rsna.path=/r"]) is None
