"""Tests of clinvla_jax.evaluate.metrics against scikit-learn and loops."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from clinvla_jax.evaluate import metrics


def loop_precision_at_k(sim, relevant, k, exclude=None):
  """Direct P@K: per query, sort by (-score, gallery index), count, / k."""
  out = []
  for q in range(sim.shape[0]):
    gallery = [g for g in range(sim.shape[1]) if exclude is None or g != exclude[q]]
    ranked = sorted(gallery, key=lambda g: (-sim[q, g], g))
    out.append(sum(bool(relevant[q, g]) for g in ranked[:k]) / k)
  return np.array(out)


def tied_scores(rng, shape):
  # One decimal: many exact ties, which the stable ranking must resolve.
  return np.round(rng.uniform(-1, 1, size=shape), 1)


# --------------------------------------------------------------------------
# Retrieval.
# --------------------------------------------------------------------------


def test_relevance_single_label():
  rel = metrics.relevance_matrix(np.array([0, 1]), np.array([1, 0, 0]))
  np.testing.assert_array_equal(rel, [[False, True, True], [True, False, False]])


def test_relevance_multilabel_ignores_uncertain_and_nan():
  q = np.array([[1, 0, 0], [0, 1, 1]], dtype=float)
  g = np.array([[1, 1, 0], [0, -1, np.nan], [0, 0, 1], [0, 0, 0]])
  rel = metrics.relevance_matrix(q, g)
  np.testing.assert_array_equal(rel, [[True, False, False, False], [True, False, True, False]])


def test_relevance_rejects_mixed_formats():
  with pytest.raises(ValueError):
    metrics.relevance_matrix(np.zeros(3), np.zeros((3, 2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_precision_matches_loop_with_ties(seed):
  rng = np.random.default_rng(seed)
  sim = tied_scores(rng, (30, 60))
  q_labels = rng.integers(0, 4, 30)
  g_labels = rng.integers(0, 4, 60)
  ks = (1, 5, 10, 37)
  got = metrics.precision_at_k(sim, q_labels, g_labels, ks)
  rel = q_labels[:, None] == g_labels[None, :]
  for k in ks:
    assert got[k] == pytest.approx(loop_precision_at_k(sim, rel, k).mean())


def test_ties_are_broken_by_gallery_index():
  # Every score equal: the ranking is the gallery order itself.
  sim = np.zeros((1, 6))
  gallery = np.array([1, 1, 0, 0, 0, 1])
  got = metrics.precision_at_k(sim, np.array([1]), gallery, ks=(1, 2, 3, 6))
  assert got == {1: 1.0, 2: 1.0, 3: 2 / 3, 6: 0.5}
  np.testing.assert_array_equal(metrics.rank_gallery(sim)[0], np.arange(6))


def test_class_smaller_than_k_still_divides_by_k():
  # Class 1 has two gallery members ranked first; P@5 = 2/5, not 1.
  sim = np.array([[0.9, 0.8, 0.1, 0.2, 0.3, 0.0, -0.1]])
  gallery = np.array([1, 1, 0, 0, 0, 0, 0])
  got = metrics.precision_at_k(sim, np.array([1]), gallery, ks=(2, 5))
  assert got == {2: 1.0, 5: 0.4}


def test_random_small_classes_match_loop():
  rng = np.random.default_rng(3)
  g_labels = np.array([0] * 3 + [1] * 2 + [2] * 40)  # classes 0, 1 below K
  q_labels = rng.integers(0, 3, 20)
  sim = tied_scores(rng, (20, g_labels.size))
  got = metrics.precision_at_k(sim, q_labels, g_labels, ks=(5, 10))
  rel = q_labels[:, None] == g_labels[None, :]
  for k in (5, 10):
    assert got[k] == pytest.approx(loop_precision_at_k(sim, rel, k).mean())


def test_single_class_gallery():
  rng = np.random.default_rng(4)
  sim = rng.normal(size=(6, 20))
  q_labels = np.array([7, 7, 7, 7, 2, 2])
  got = metrics.precision_at_k(sim, q_labels, np.full(20, 7), ks=(5, 20))
  # Four of six queries share the gallery's only class, and hit every time.
  assert got == {5: pytest.approx(4 / 6), 20: pytest.approx(4 / 6)}


def test_exclude_self_matches_loop():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 3, 25)
  emb = rng.normal(size=(25, 4))
  sim = np.round(emb @ emb.T, 1)
  got = metrics.precision_at_k(sim, labels, labels, ks=(1, 5, 24), exclude_self=True)
  rel = labels[:, None] == labels[None, :]
  for k in (1, 5, 24):
    want = loop_precision_at_k(sim, rel, k, exclude=np.arange(25)).mean()
    assert got[k] == pytest.approx(want)
  # Without exclusion each query finds itself first.
  assert metrics.precision_at_k(sim + 10 * np.eye(25), labels, labels, ks=(1,))[1] == 1.0


def test_excluded_item_is_dropped_even_with_lowest_score():
  # The excluded item must not occupy a top-K slot even when K reaches it.
  sim = np.array([[0.1, 0.9, 0.8]])
  rel = np.array([[True, False, True]])
  per_query = metrics.precision_at_k_per_query(sim, rel, (2,), exclude_index=np.array([0]))
  assert per_query[0, 0] == 0.5
  with pytest.raises(ValueError):
    metrics.precision_at_k_per_query(sim, rel, (3,), exclude_index=np.array([0]))


def test_multilabel_precision_matches_loop():
  rng = np.random.default_rng(6)
  q = (rng.random((15, 5)) < 0.3).astype(float)
  g = rng.choice([-1.0, 0.0, 1.0, np.nan], size=(40, 5), p=[0.1, 0.5, 0.3, 0.1])
  sim = tied_scores(rng, (15, 40))
  got = metrics.precision_at_k(sim, q, g, ks=(5, 10))
  rel = np.array([[bool(np.any((qi > 0) & (np.nan_to_num(gj) > 0))) for gj in g] for qi in q])
  for k in (5, 10):
    assert got[k] == pytest.approx(loop_precision_at_k(sim, rel, k).mean())


def test_k_beyond_gallery_and_nan_rejected():
  with pytest.raises(ValueError):
    metrics.precision_at_k(np.zeros((1, 3)), np.array([0]), np.zeros(3), (4,))
  with pytest.raises(ValueError):
    metrics.precision_at_k(np.array([[np.nan, 0.0]]), np.array([0]), np.zeros(2), (1,))


# --------------------------------------------------------------------------
# Classification metrics against scikit-learn.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 200)
  scores = np.round(rng.random(200) + 0.3 * y, 1)
  assert metrics.roc_auc(y, scores) == pytest.approx(skm.roc_auc_score(y, scores), abs=1e-12)


def test_roc_auc_known_values():
  assert metrics.roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.roc_auc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert metrics.roc_auc([0, 1], [0.5, 0.5]) == 0.5
  with pytest.raises(ValueError):
    metrics.roc_auc([1, 1, 1], [0.1, 0.2, 0.3])


def test_average_ranks_matches_scipy():
  v = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
  np.testing.assert_allclose(metrics.average_ranks(v), stats.rankdata(v, method="average"))


@pytest.mark.parametrize("seed", range(5))
def test_f1_and_accuracy_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 100)
  pred = rng.integers(0, 2, 100)
  assert metrics.f1_score(y, pred) == pytest.approx(skm.f1_score(y, pred))
  assert metrics.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))


def test_f1_degenerate_cases_match_sklearn():
  for y, pred in [
    ([0, 0, 0], [0, 0, 0]),
    ([1, 0, 1], [0, 0, 0]),
    ([0, 0, 0], [1, 0, 0]),
    ([True, False], [True, True]),
  ]:
    want = skm.f1_score(y, pred, zero_division=0.0)
    assert metrics.f1_score(np.array(y), np.array(pred)) == pytest.approx(want)


def test_multiclass_accuracy_and_macro_accuracy_match_sklearn():
  rng = np.random.default_rng(7)
  y = rng.integers(0, 3, 90)
  pred = np.where(rng.random(90) < 0.6, y, rng.integers(0, 3, 90))
  assert metrics.accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
  assert metrics.macro_accuracy(y, pred) == pytest.approx(skm.balanced_accuracy_score(y, pred))


def test_binary_labels_validated():
  with pytest.raises(ValueError):
    metrics.f1_score(np.array([0, 2]), np.array([0, 1]))


# --------------------------------------------------------------------------
# RSNA threshold protocol.
# --------------------------------------------------------------------------


def test_threshold_grid():
  grid = metrics.THRESHOLD_GRID
  assert grid.size == 201 and grid[0] == 0.0 and grid[-1] == 1.0
  np.testing.assert_allclose(np.diff(grid), 0.005)


def test_stratified_folds_balanced_and_deterministic():
  y = np.array([0] * 73 + [1] * 27)
  folds = metrics.stratified_folds(y, 10, seed=0)
  np.testing.assert_array_equal(folds, metrics.stratified_folds(y, 10, seed=0))
  assert not np.array_equal(folds, metrics.stratified_folds(y, 10, seed=1))
  sizes = np.bincount(folds, minlength=10)
  assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 100
  for c, n in ((0, 73), (1, 27)):
    per_fold = np.bincount(folds[y == c], minlength=10)
    assert set(per_fold) <= {n // 10, -(-n // 10)}


def test_best_threshold_is_smallest_of_the_best():
  y = np.array([1] * 40 + [0] * 40 + [0] * 20)
  scores = np.array([0.8] * 40 + [0.2] * 40 + [0.6] * 20)
  # Thresholds in (0.6, 0.8] give F1 = 1; the first grid point there is 0.605.
  assert metrics.best_f1_threshold(y, scores) == 0.605


def test_f1_per_threshold_matches_sklearn():
  rng = np.random.default_rng(8)
  y = rng.integers(0, 2, 80)
  scores = rng.random(80)
  grid = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
  want = [skm.f1_score(y, scores >= t, zero_division=0.0) for t in grid]
  np.testing.assert_allclose(metrics.f1_per_threshold(y, scores, grid), want)


def test_threshold_cv_separable_scores():
  # Few distinct values, so every training part holds the largest negative
  # and the chosen threshold (just above it) separates every held-out fold.
  rng = np.random.default_rng(9)
  y = rng.integers(0, 2, 300)
  scores = np.where(y == 1, rng.choice([0.6, 0.7, 0.8, 0.9], 300), rng.choice([0.1, 0.2, 0.3, 0.4], 300))
  out = metrics.threshold_cv(y, scores)
  assert out["ACC"] == 1.0 and out["F1"] == 1.0
  assert out["thresholds"] == [0.405] * 10


def test_threshold_cv_known_threshold_and_scores():
  # 30 positives at 0.9, 10 at 0.5; 30 negatives at 0.1, 20 at 0.5.
  # t <= 0.5 gives F1 = 0.8, t in (0.5, 0.9] gives 6/7: the choice is 0.505,
  # which misses exactly the positives at 0.5 in every held-out fold.
  y = np.array([1] * 40 + [0] * 50)
  scores = np.array([0.9] * 30 + [0.5] * 10 + [0.1] * 30 + [0.5] * 20)
  out = metrics.threshold_cv(y, scores, n_splits=10, seed=0)
  assert out["thresholds"] == [0.505] * 10
  folds = metrics.stratified_folds(y, 10, seed=0)
  accs, f1s = [], []
  for f in range(10):
    test = folds == f
    pred = scores[test] >= 0.505
    accs.append(skm.accuracy_score(y[test], pred))
    f1s.append(skm.f1_score(y[test], pred))
  assert out["ACC"] == pytest.approx(np.mean(accs))
  assert out["F1"] == pytest.approx(np.mean(f1s))
  assert out["ACC"] == pytest.approx(80 / 90, abs=0.02)


def test_threshold_cv_matches_independent_loop():
  rng = np.random.default_rng(10)
  y = (rng.random(250) < 0.3).astype(int)
  scores = 1 / (1 + np.exp(-(rng.normal(size=250) + 1.2 * y)))
  # 5 folds: scikit-learn scores each fold's 201 thresholds one call at a time (5 ms a call).
  out = metrics.threshold_cv(y, scores, n_splits=5, seed=0)
  folds = metrics.stratified_folds(y, 5, seed=0)
  grid = np.arange(201) * 0.005
  accs, f1s = [], []
  for f in range(5):
    train, test = folds != f, folds == f
    f1_grid = [skm.f1_score(y[train], scores[train] >= t, zero_division=0.0) for t in grid]
    t = grid[int(np.argmax(f1_grid))]
    accs.append(skm.accuracy_score(y[test], scores[test] >= t))
    f1s.append(skm.f1_score(y[test], scores[test] >= t, zero_division=0.0))
  assert out["ACC"] == pytest.approx(np.mean(accs))
  assert out["F1"] == pytest.approx(np.mean(f1s))
  assert out["ACC_std"] == pytest.approx(np.std(accs))
