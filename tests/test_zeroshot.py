"""Tests of clinvla_jax.evaluate.zeroshot on synthetic embeddings."""

import json

import numpy as np
import pytest
from sklearn import linear_model
from sklearn import metrics as skm

from clinvla_jax.evaluate import zeroshot


def normalized(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def prompt_lookup_embed_fn(prompts_by_class, protos, rng, noise=0.1):
  """text_embed_fn sending every prompt of class c near prototype c."""
  table = {}
  for c, prompts in enumerate(prompts_by_class.values()):
    for p in prompts:
      table.setdefault(p, normalized(protos[c] + noise * rng.normal(size=protos.shape[1])))
  calls = []

  def fn(texts):
    calls.append(len(texts))
    return np.stack([table[t] for t in texts])

  return fn, calls


# --------------------------------------------------------------------------
# Prompts.
# --------------------------------------------------------------------------


def test_bundled_prompts_are_the_published_copies(reference_prompts_dir):
  for name in (zeroshot.CHEXPERT_5X200_PROMPTS, zeroshot.PNEUMONIA_PROMPTS):
    ours = zeroshot.load_prompt_file(name)
    ref = json.loads((reference_prompts_dir / name).read_text())
    assert ours == ref


def test_join_prompt_drops_empty_parts():
  assert zeroshot.join_prompt(["", "mild", "pulmonary edema", ""]) == ("mild pulmonary edema")
  assert zeroshot.join_prompt(["", "x  y"]) == "x y"


def test_all_combinations_in_product_order_with_duplicates():
  groups = [["", "a"], ["b", "b"], ["c"]]
  assert zeroshot.combine_prompt_parts(groups) == ["b c", "b c", "a b c", "a b c"]


def test_chexpert_5x200_prompt_counts():
  prompts = zeroshot.chexpert_5x200_prompts()
  data = zeroshot.load_prompt_file(zeroshot.CHEXPERT_5X200_PROMPTS)
  assert tuple(prompts) == zeroshot.CHEXPERT_5X200_CLASSES
  for name, groups in data["classes"].items():
    assert len(prompts[name]) == int(np.prod([len(g) for g in groups]))
  assert {k: len(v) for k, v in prompts.items()} == {
    "Atelectasis": 210,
    "Cardiomegaly": 15,
    "Consolidation": 192,
    "Edema": 18,
    "Pleural Effusion": 54,
  }
  assert "mild pulmonary edema" in prompts["Edema"]
  assert "pulmonary edema" in prompts["Edema"]  # empty first part dropped
  assert all("  " not in p and p == p.strip() for ps in prompts.values() for p in ps)


def test_prompt_cap_is_seeded_subset_in_order():
  full = zeroshot.chexpert_5x200_prompts()
  capped = zeroshot.chexpert_5x200_prompts(max_per_class=10, seed=0)
  again = zeroshot.chexpert_5x200_prompts(max_per_class=10, seed=0)
  other = zeroshot.chexpert_5x200_prompts(max_per_class=10, seed=1)
  assert capped == again
  assert capped["Atelectasis"] != other["Atelectasis"]
  for name, prompts in capped.items():
    assert len(prompts) == 10
    remaining = iter(full[name])  # a subsequence: kept in product order
    assert all(any(p == q for q in remaining) for p in prompts)
  # A cap above the number of combinations keeps them all.
  assert zeroshot.chexpert_5x200_prompts(max_per_class=10_000) == full


def test_pneumonia_prompt_sets():
  assert zeroshot.pneumonia_prompts() == {"positive": ["There is pneumonia"], "negative": ["There is no pneumonia"]}
  biovil = zeroshot.pneumonia_prompts("biovil")
  assert len(biovil["positive"]) == 4 and len(biovil["negative"]) == 4


# --------------------------------------------------------------------------
# Zero-shot classification.
# --------------------------------------------------------------------------


def test_class_embeddings_are_normalised_means():
  vecs = {"a": np.array([2.0, 0.0]), "b": np.array([0.0, 1.0]), "c": np.array([1.0, 1.0])}
  out = zeroshot.class_embeddings(
    {"x": ["a", "b"], "y": ["c"]}, lambda t: np.stack([vecs[s] for s in t]), class_names=("y", "x")
  )
  np.testing.assert_allclose(out, [[2**-0.5, 2**-0.5], [2**-0.5, 2**-0.5]], atol=1e-12)
  out = zeroshot.class_embeddings({"x": ["a", "b", "b"]}, lambda t: np.stack([vecs[s] for s in t]))
  np.testing.assert_allclose(out, normalized(np.array([[1.0, 2.0]])))


def test_class_embeddings_checks_row_count():
  with pytest.raises(ValueError):
    zeroshot.class_embeddings({"x": ["a", "b"]}, lambda t: np.zeros((1, 3)))


def test_zero_shot_predict_argmax():
  classes = np.eye(3)
  images = np.array([[0.1, 0.9, 0.0], [1.0, 0.0, 0.2], [0.0, 0.3, 0.31]])
  pred, cos = zeroshot.zero_shot_predict(images, classes)
  np.testing.assert_array_equal(pred, [1, 0, 2])
  assert cos.shape == (3, 3)


def test_chexpert_5x200_zero_shot_known_answer():
  rng = np.random.default_rng(0)
  protos = normalized(rng.normal(size=(5, 32)))
  prompts = zeroshot.chexpert_5x200_prompts()
  fn, calls = prompt_lookup_embed_fn(prompts, protos, rng)
  labels = np.repeat(np.arange(5), 8)
  images = normalized(protos[labels] + 0.2 * rng.normal(size=(40, 32)))
  assert zeroshot.chexpert_5x200_zero_shot(images, labels, fn) == {
    "ACC": 1.0,
    "ACC_majority": 0.2,
    "ACC_ci_low": 1.0,
    "ACC_ci_high": 1.0,
  }
  assert calls == [sum(len(p) for p in prompts.values())]  # one batched call
  # Class names work as labels too; shifted labels are all wrong.
  names = np.array(zeroshot.CHEXPERT_5X200_CLASSES)[labels]
  assert zeroshot.chexpert_5x200_zero_shot(images, names, fn)["ACC"] == 1.0
  shifted = (labels + 1) % 5
  assert zeroshot.chexpert_5x200_zero_shot(images, shifted, fn)["ACC"] == 0.0


def test_binary_probability_is_softmax_of_cosines():
  rng = np.random.default_rng(1)
  img = normalized(rng.normal(size=(6, 8)))
  pos, neg = normalized(rng.normal(size=(2, 8)))
  for scale in (1.0, 14.3):
    logits = scale * np.stack([img @ pos, img @ neg], axis=1)
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(zeroshot.binary_probability(img, pos, neg, scale), softmax[:, 0])


def test_rsna_zero_shot_separable_and_vs_sklearn():
  rng = np.random.default_rng(2)
  pos_dir, neg_dir = np.eye(16)[:2]
  text = {"There is pneumonia": pos_dir, "There is no pneumonia": neg_dir}
  fn = lambda t: np.stack([text[s] for s in t])
  y = (rng.random(400) < 0.3).astype(int)
  # Sick images lean to the positive prompt, by a clear margin.
  lean = np.where(y[:, None] == 1, 0.9 * pos_dir + 0.3 * neg_dir, 0.3 * pos_dir + 0.9 * neg_dir)
  other = np.concatenate([np.zeros((400, 2)), rng.normal(size=(400, 14))], 1)
  images = normalized(lean + 0.3 * other)
  out = zeroshot.rsna_zero_shot(images, y, fn)
  assert out["AUC"] == 1.0 and out["ACC"] == 1.0 and out["F1"] == 1.0
  # Noisy images: AUC equals scikit-learn's on the protocol's probability.
  noisy = normalized(lean + 2.0 * rng.normal(size=(400, 16)))
  out = zeroshot.rsna_zero_shot(noisy, y, fn)
  p = zeroshot.binary_probability(noisy, pos_dir, neg_dir)
  assert out["AUC"] == pytest.approx(skm.roc_auc_score(y, p))
  assert 0.5 < out["AUC"] < 1.0
  assert set(out) == {"AUC", "ACC", "F1", "ACC_std", "F1_std", "AUC_chance", "ACC_majority", "F1_all_positive"}
  assert out["AUC_chance"] == 0.5
  # The baselines do not look at the images, only at the labels' balance.
  assert out["ACC_majority"] == pytest.approx(1 - y.mean(), abs=0.01)
  assert out["F1_all_positive"] == pytest.approx(2 * y.mean() / (1 + y.mean()), abs=0.01)


# --------------------------------------------------------------------------
# Linear probe.
# --------------------------------------------------------------------------


def test_logistic_regression_matches_sklearn():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(120, 5))
  y = np.argmax(x[:, :3] + 0.8 * rng.normal(size=(120, 3)), axis=1)
  l2 = 0.05
  params = zeroshot.fit_logistic_regression(x, y, 3, l2=l2)
  ref = linear_model.LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=10_000).fit(x, y)
  logits = x @ params["w"] + params["b"]
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs /= probs.sum(1, keepdims=True)
  np.testing.assert_allclose(probs, ref.predict_proba(x), atol=1e-5)
  np.testing.assert_array_equal(zeroshot.predict_logistic_regression(params, x), ref.predict(x))


def test_linear_probe_cv():
  rng = np.random.default_rng(4)
  y = np.repeat(np.arange(3), 20)
  separable = np.eye(3)[y] * 5 + 0.1 * rng.normal(size=(60, 3))
  out = zeroshot.linear_probe_cv(separable, y, n_splits=5, seed=0)
  assert out["mean"] == 1.0 and out["std"] == 0.0 and len(out["folds"]) == 5
  # Pure noise: chance level, and the result is reproducible.
  noise = rng.normal(size=(60, 4))
  a = zeroshot.linear_probe_cv(noise, y, n_splits=5, seed=0)
  b = zeroshot.linear_probe_cv(noise, y, n_splits=5, seed=0)
  assert a == b
  assert a["mean"] < 0.7
