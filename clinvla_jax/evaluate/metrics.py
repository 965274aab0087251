"""Model-independent evaluation metrics (numpy only).

Conventions shared by every function here:

* Scores are returned as fractions in [0, 1]; tables turn them into percents.
* Retrieval ranks a gallery by descending similarity with a *stable* sort, so
  equal scores keep gallery order: the lower gallery index is ranked first.
  Any tie therefore has one reproducible answer, independent of platform.
* P@K is (relevant items among the top K) / K, always divided by K, as in
  ConVIRT and GLoRIA.  A query whose class has fewer than K members in the
  gallery can therefore not reach 1.0; that is intended, because it is how the
  published numbers were computed.  K larger than the number of rankable
  gallery items is an error rather than a silently different metric.
* Binary labels: 1 (or True) is the positive class.  A binary prediction is
  positive when ``score >= threshold``.
* Chance levels say what a model that learned nothing would score: for P@K
  the expected P@K of a uniformly random ranking, (relevant rankable items) /
  (rankable items) per query, whatever K; for R@K (own paired item in the top
  K) K / G; for accuracy the majority label; for AUC 0.5.
* Uncertainty is a percentile bootstrap over queries (or studies): resample
  them with replacement, take the mean of each resample, report the 2.5 and
  97.5 percentiles.  It is seeded, so one input gives one interval.
"""

from collections.abc import Sequence
from typing import Optional

import numpy as np

# The RSNA protocol's threshold grid, 0:0.005:1 with both ends included.
THRESHOLD_GRID = np.round(np.arange(201) * 0.005, 3)


# ---------------------------------------------------------------------------
# Retrieval.
# ---------------------------------------------------------------------------


def relevance_matrix(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
  """Which gallery items are relevant to which queries.

  Two label formats are accepted, and both sides must use the same one:

  * 1-D class ids (ints or strings), shape [Q] and [G]: relevant when equal.
  * 2-D multi-hot matrices over the same label columns, [Q, C] and [G, C]:
    relevant when the two share at least one positive label.  A label is
    positive when its value is > 0, so CheXpert's uncertain (-1), negative (0)
    and not-mentioned (NaN) entries never make an item relevant.  A query with
    a single positive column (e.g. a CheXpert 8x200 query class) thus matches
    exactly the gallery items whose label for that class is 1.

  Args:
    query_labels: [Q] class ids or [Q, C] multi-hot labels.
    gallery_labels: [G] class ids or [G, C] multi-hot labels.

  Returns:
    bool [Q, G].
  """
  q = np.asarray(query_labels)
  g = np.asarray(gallery_labels)
  if q.ndim != g.ndim or q.ndim not in (1, 2):
    raise ValueError(f"labels must both be 1-D or both 2-D, got {q.shape} and {g.shape}")
  if q.ndim == 1:
    return q[:, None] == g[None, :]
  if q.shape[1] != g.shape[1]:
    raise ValueError(f"label columns differ: {q.shape} vs {g.shape}")
  q_pos = np.nan_to_num(q.astype(np.float64)) > 0
  g_pos = np.nan_to_num(g.astype(np.float64)) > 0
  return (q_pos.astype(np.int64) @ g_pos.T.astype(np.int64)) > 0


def rank_gallery(similarity: np.ndarray, exclude_index: Optional[np.ndarray] = None) -> np.ndarray:
  """Gallery indices of each query, best first.

  Sorted by descending similarity; ties keep gallery order (stable sort).  An
  excluded item is moved behind every other item, whatever its score, and is
  then dropped by the callers that take ``exclude_index``.

  Args:
    similarity: float [Q, G].
    exclude_index: optional int [Q]: the gallery index to drop for each query,
      negative for none.

  Returns:
    int [Q, G] permutation of the gallery per query.
  """
  sim = np.asarray(similarity, dtype=np.float64)
  if sim.ndim != 2:
    raise ValueError(f"similarity must be [Q, G], got {sim.shape}")
  if np.isnan(sim).any():
    raise ValueError("similarity contains NaN")
  order = np.argsort(-sim, axis=1, kind="stable")
  if exclude_index is None:
    return order
  excluded = _exclusion_mask(sim.shape, exclude_index)
  # A second stable sort on the excluded flag keeps the score order of the rest.
  moved = np.argsort(np.take_along_axis(excluded, order, axis=1), axis=1, kind="stable")
  return np.take_along_axis(order, moved, axis=1)


def _exclusion_mask(shape: tuple[int, int], exclude_index: np.ndarray) -> np.ndarray:
  """bool [Q, G], True at each query's excluded gallery item."""
  idx = np.asarray(exclude_index, dtype=np.int64)
  if idx.shape != (shape[0],):
    raise ValueError(f"exclude_index must be [{shape[0]}], got {idx.shape}")
  if (idx >= shape[1]).any():
    raise ValueError("exclude_index points past the gallery")
  mask = np.zeros(shape, dtype=bool)
  rows = np.nonzero(idx >= 0)[0]
  mask[rows, idx[rows]] = True
  return mask


def precision_at_k_per_query(
  similarity: np.ndarray,
  relevant: np.ndarray,
  ks: Sequence[int],
  exclude_index: Optional[np.ndarray] = None,
) -> np.ndarray:
  """P@K of every query.

  Args:
    similarity: float [Q, G] query-gallery scores.
    relevant: bool [Q, G] relevance (see `relevance_matrix`).
    ks: cut-offs.
    exclude_index: optional int [Q]: a gallery item to leave out of each
      query's ranking (negative for none), e.g. the query itself when the
      query set is the gallery.

  Returns:
    float [Q, len(ks)].
  """
  relevant = np.asarray(relevant, dtype=bool)
  if relevant.shape != np.shape(similarity):
    raise ValueError(f"relevance {relevant.shape} != similarity {np.shape(similarity)}")
  num_gallery = relevant.shape[1]
  rankable = num_gallery
  if exclude_index is not None:
    relevant = relevant & ~_exclusion_mask(relevant.shape, exclude_index)
    rankable -= int((np.asarray(exclude_index) >= 0).any())
  for k in ks:
    if not 1 <= k <= rankable:
      raise ValueError(f"K={k} outside [1, {rankable}] rankable gallery items")
  order = rank_gallery(similarity, exclude_index)
  hits = np.cumsum(np.take_along_axis(relevant, order, axis=1), axis=1)
  return np.stack([hits[:, k - 1] / k for k in ks], axis=1)


def precision_at_k(
  similarity: np.ndarray,
  query_labels: np.ndarray,
  gallery_labels: np.ndarray,
  ks: Sequence[int] = (5, 10, 50),
  exclude_self: bool = False,
) -> dict[int, float]:
  """Mean P@K over queries, with relevance by shared label.

  Args:
    similarity: float [Q, G].
    query_labels: labels of the queries (see `relevance_matrix`).
    gallery_labels: labels of the gallery.
    ks: cut-offs.
    exclude_self: the queries are the gallery (Q == G, same order) and each
      query must not retrieve itself, as in image->image search within one set.

  Returns:
    {K: mean P@K}.
  """
  relevant = relevance_matrix(query_labels, gallery_labels)
  exclude_index = _self_exclusion(relevant.shape, exclude_self)
  per_query = precision_at_k_per_query(similarity, relevant, ks, exclude_index)
  return {k: float(v) for k, v in zip(ks, per_query.mean(axis=0))}


def _self_exclusion(shape: tuple[int, int], exclude_self: bool) -> Optional[np.ndarray]:
  """exclude_index that drops query i from its own gallery, or None."""
  if not exclude_self:
    return None
  q, g = shape
  if q != g:
    raise ValueError(f"exclude_self needs Q == G, got {q} and {g}")
  return np.arange(q)


def chance_precision_per_query(relevant: np.ndarray, exclude_index: Optional[np.ndarray] = None) -> np.ndarray:
  """Expected P@K of each query under a uniformly random gallery ranking.

  A random ranking puts each rankable item in the top K with probability
  K / n, so the expected number of relevant items there is K * r / n and the
  expected P@K is r / n for every K (r relevant and n rankable items).  An
  excluded item counts in neither r nor n.

  Args:
    relevant: bool [Q, G] relevance (see `relevance_matrix`).
    exclude_index: optional int [Q], as in `precision_at_k_per_query`.

  Returns:
    float [Q].
  """
  relevant = np.asarray(relevant, dtype=bool)
  if relevant.ndim != 2:
    raise ValueError(f"relevance must be [Q, G], got {relevant.shape}")
  rankable = np.full(relevant.shape[0], relevant.shape[1], dtype=np.float64)
  if exclude_index is not None:
    excluded = _exclusion_mask(relevant.shape, exclude_index)
    relevant = relevant & ~excluded
    rankable -= excluded.sum(axis=1)
  if (rankable < 1).any():
    raise ValueError("a query has no rankable gallery item")
  return relevant.sum(axis=1) / rankable


def bootstrap_ci(
  per_item: np.ndarray, num_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> tuple[np.ndarray, np.ndarray]:
  """Percentile bootstrap interval of a mean over items (e.g. queries).

  Every resample draws Q items with replacement from
  ``np.random.default_rng(seed)``; all columns share the same resamples, so
  the intervals of P@5 and P@10 of one query set come from one set of draws.

  Args:
    per_item: float [Q] or [Q, M] per-item scores (e.g. per-query P@K).
    num_resamples: bootstrap resamples (>= 1).
    seed: resampling seed.
    level: coverage of the interval.

  Returns:
    (low, high): floats for [Q] input, float [M] arrays for [Q, M].
  """
  x = np.asarray(per_item, dtype=np.float64)
  if x.ndim not in (1, 2) or x.shape[0] < 1:
    raise ValueError(f"expected [Q] or [Q, M] with Q >= 1, got {x.shape}")
  if num_resamples < 1:
    raise ValueError("num_resamples must be >= 1")
  if not 0.0 < level < 1.0:
    raise ValueError("level must lie in (0, 1)")
  cols = x.reshape(x.shape[0], -1)
  n = cols.shape[0]
  rng = np.random.default_rng(seed)
  means = np.empty((num_resamples, cols.shape[1]))
  # Draws go in chunks so that memory stays bounded for large query sets; the
  # chunk size depends on Q alone, so the interval stays a function of the
  # inputs and the seed.
  chunk = max(1, 2**21 // (n * cols.shape[1]))
  for start in range(0, num_resamples, chunk):
    stop = min(start + chunk, num_resamples)
    idx = rng.integers(0, n, size=(stop - start, n))
    means[start:stop] = cols[idx].mean(axis=1)
  tail = 100.0 * (1.0 - level) / 2.0
  low, high = np.percentile(means, [tail, 100.0 - tail], axis=0)
  if x.ndim == 1:
    return float(low[0]), float(high[0])
  return low, high


def summarize(
  name: str, per_item: np.ndarray, chance: Optional[float], num_resamples: int = 1000, seed: int = 0
) -> dict[str, float]:
  """{name: mean, name_chance, name_ci_low, name_ci_high} of one score.

  ``chance`` None leaves out the chance key; ``num_resamples`` 0 leaves out
  the interval.
  """
  x = np.asarray(per_item, dtype=np.float64)
  out = {name: float(x.mean())}
  if chance is not None:
    out[f"{name}_chance"] = float(chance)
  if num_resamples:
    low, high = bootstrap_ci(x, num_resamples, seed)
    out[f"{name}_ci_low"] = float(low)
    out[f"{name}_ci_high"] = float(high)
  return out


def majority_precision_per_query(
  relevant: np.ndarray, ks: Sequence[int], exclude_index: Optional[np.ndarray] = None
) -> np.ndarray:
  """float [Q, len(ks)]: P@K of every query when every query gets the same ranking, the label prior's.

  The gallery is ranked once, by how many queries each item is relevant to (ties by gallery index), whatever the
  query: the best ranking that ignores the query (the mean P@K of a fixed list is the mean of its items'
  relevant-query fractions), as "always the majority class" is the best constant classifier.  A model that
  learned only which findings are common scores this, not chance.
  """
  relevant = np.asarray(relevant, dtype=bool)
  prior = relevant.sum(axis=0).astype(np.float64)
  return precision_at_k_per_query(np.broadcast_to(prior, relevant.shape), relevant, ks, exclude_index)


def precision_at_k_summary(
  similarity: np.ndarray,
  query_labels: np.ndarray,
  gallery_labels: np.ndarray,
  ks: Sequence[int] = (5, 10, 50),
  exclude_self: bool = False,
  num_resamples: int = 1000,
  seed: int = 0,
) -> dict[str, float]:
  """Mean P@K with its chance level and bootstrap interval over queries.

  Args: as `precision_at_k`, plus the bootstrap's ``num_resamples`` (0: no
    interval) and ``seed``.

  Returns:
    {"P@K": mean (as `precision_at_k`), "P@K_chance": mean of
     `chance_precision_per_query`, "P@K_majority": mean of
     `majority_precision_per_query`, "P@K_ci_low", "P@K_ci_high"} per K.
  """
  relevant = relevance_matrix(query_labels, gallery_labels)
  exclude_index = _self_exclusion(relevant.shape, exclude_self)
  per_query = precision_at_k_per_query(similarity, relevant, ks, exclude_index)
  chance = float(chance_precision_per_query(relevant, exclude_index).mean())
  majority = majority_precision_per_query(relevant, ks, exclude_index).mean(axis=0)
  low = high = None
  if num_resamples:
    low, high = bootstrap_ci(per_query, num_resamples, seed)
  out = {}
  for j, k in enumerate(ks):
    out[f"P@{k}"] = float(per_query[:, j].mean())
    out[f"P@{k}_chance"] = chance
    out[f"P@{k}_majority"] = float(majority[j])
    if low is not None:
      out[f"P@{k}_ci_low"] = float(low[j])
      out[f"P@{k}_ci_high"] = float(high[j])
  return out


def rank_of(similarity: np.ndarray, target_index: np.ndarray) -> np.ndarray:
  """1-based rank of one gallery item per query, as `rank_gallery` ranks.

  An item is ahead of the target when its score is higher, or equal with a
  lower gallery index (the stable tie rule), so no full sort is needed.

  Args:
    similarity: float [Q, G].
    target_index: int [Q] gallery index of each query's target.

  Returns:
    int [Q] in [1, G].
  """
  sim = np.asarray(similarity, dtype=np.float64)
  if sim.ndim != 2:
    raise ValueError(f"similarity must be [Q, G], got {sim.shape}")
  if np.isnan(sim).any():
    raise ValueError("similarity contains NaN")
  target = np.asarray(target_index, dtype=np.int64)
  if target.shape != (sim.shape[0],):
    raise ValueError(f"target_index must be [{sim.shape[0]}], got {target.shape}")
  if ((target < 0) | (target >= sim.shape[1])).any():
    raise ValueError("target_index outside the gallery")
  own = sim[np.arange(sim.shape[0]), target][:, None]
  lower_index = np.arange(sim.shape[1])[None, :] < target[:, None]
  ahead = (sim > own) | ((sim == own) & lower_index)
  return ahead.sum(axis=1) + 1


def recall_at_k_per_query(
  similarity: np.ndarray, ks: Sequence[int], target_index: Optional[np.ndarray] = None
) -> np.ndarray:
  """Instance-level R@K: is each query's own item among its top K?

  Args:
    similarity: float [Q, G].
    ks: cut-offs, each in [1, G].
    target_index: int [Q] gallery index of each query's own item; by default
      query i's item is gallery item i (paired sets, Q == G).

  Returns:
    float [Q, len(ks)] of 0/1.
  """
  sim = np.asarray(similarity)
  if target_index is None:
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
      raise ValueError(f"paired recall needs a square similarity, got {sim.shape}")
    target_index = np.arange(sim.shape[0])
  for k in ks:
    if not 1 <= k <= sim.shape[1]:
      raise ValueError(f"K={k} outside [1, {sim.shape[1]}] gallery items")
  rank = rank_of(sim, target_index)
  return np.stack([(rank <= k).astype(np.float64) for k in ks], axis=1)


# ---------------------------------------------------------------------------
# Classification.
# ---------------------------------------------------------------------------


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Fraction of exact matches (also the zero-shot multi-class accuracy)."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  _check_same_length(y_true, y_pred)
  return float(np.mean(y_true == y_pred))


def majority_accuracy(y_true: np.ndarray) -> float:
  """Accuracy of always predicting the most frequent class of ``y_true``."""
  y = np.asarray(y_true)
  if y.ndim != 1 or y.size == 0:
    raise ValueError(f"expected non-empty 1-D labels, got {y.shape}")
  _, counts = np.unique(y, return_counts=True)
  return float(counts.max() / y.size)


def majority_label_hits(positive: np.ndarray) -> np.ndarray:
  """Top-1 hits of always predicting the label most often positive.

  The multi-label counterpart of `majority_accuracy`: a study is a hit when
  the single label positive in the most studies (the lowest column among
  equals) is one of its positive labels.

  Args:
    positive: bool [N, C].

  Returns:
    bool [N].
  """
  pos = np.asarray(positive, dtype=bool)
  if pos.ndim != 2 or pos.shape[1] == 0:
    raise ValueError(f"expected [N, C] positives, got {pos.shape}")
  return pos[:, int(np.argmax(pos.sum(axis=0)))]


def balanced_hit_rate(hit: np.ndarray, positive: np.ndarray) -> float:
  """Balanced accuracy of multi-label top-1 predictions: the mean over labels of the hit rate among their positives.

  Args:
    hit: float [N] per-study hit (1/0, or an expected hit rate for a baseline).
    positive: bool [N, C]; labels without a positive study are left out.
  """
  pos = np.asarray(positive, bool)
  hit = np.asarray(hit, np.float64)
  counts = pos.sum(axis=0)
  used = counts > 0
  if not used.any():
    raise ValueError("no label has a positive study")
  return float(((hit[:, None] * pos).sum(axis=0)[used] / counts[used]).mean())


def balanced_summary(
  name: str,
  hit: np.ndarray,
  positive: np.ndarray,
  baselines: dict[str, np.ndarray],
  num_resamples: int = 1000,
  seed: int = 0,
) -> dict[str, float]:
  """{name, name_<baseline> for each of ``baselines`` (per-study hits), name_ci_low/high} of `balanced_hit_rate`.

  The interval resamples studies (``num_resamples`` 0: none); a resample is scored over the labels it holds.
  """
  out = {name: balanced_hit_rate(hit, positive)}
  for suffix, baseline in baselines.items():
    out[f"{name}_{suffix}"] = balanced_hit_rate(baseline, positive)
  if num_resamples:
    rng = np.random.default_rng(seed)
    n = len(hit)
    draws = [balanced_hit_rate(hit[i], positive[i]) for i in (rng.integers(0, n, n) for _ in range(num_resamples))]
    tail = 2.5
    low, high = np.percentile(draws, [tail, 100.0 - tail])
    out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(low), float(high)
  return out


def macro_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Mean over the classes present in ``y_true`` of per-class accuracy.

  This is balanced accuracy (mean per-class recall), the "macro accuracy" that
  BioViL-T reports for MS-CXR-T temporal classification.
  """
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  _check_same_length(y_true, y_pred)
  classes = np.unique(y_true)
  return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def f1_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
  """Binary F1 of the positive class; 0.0 when it is undefined (no positives
  among either labels or predictions), like scikit-learn's default."""
  t = _as_binary(y_true)
  p = _as_binary(y_pred)
  _check_same_length(t, p)
  tp = np.sum(t & p)
  denom = 2 * tp + np.sum(~t & p) + np.sum(t & ~p)
  return float(2 * tp / denom) if denom else 0.0


def roc_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
  """Area under the ROC curve (binary).

  Computed as the Mann-Whitney U statistic on ranks, with tied scores given
  their average rank, so a tied positive-negative pair counts one half.  This
  equals the trapezoidal ROC area that scikit-learn reports.
  """
  t = _as_binary(y_true)
  s = np.asarray(scores, dtype=np.float64)
  _check_same_length(t, s)
  num_pos = int(t.sum())
  num_neg = t.size - num_pos
  if num_pos == 0 or num_neg == 0:
    raise ValueError("ROC AUC needs both classes in y_true")
  ranks = average_ranks(s)
  u = ranks[t].sum() - num_pos * (num_pos + 1) / 2
  return float(u / (num_pos * num_neg))


def average_ranks(values: np.ndarray) -> np.ndarray:
  """1-based ascending ranks; tied values share the mean of their ranks."""
  v = np.asarray(values, dtype=np.float64)
  order = np.argsort(v, kind="stable")
  sorted_v = v[order]
  # Start of each run of equal values, and the run each sorted item is in.
  starts = np.r_[True, sorted_v[1:] != sorted_v[:-1]]
  run_id = np.cumsum(starts) - 1
  first = np.nonzero(starts)[0]
  last = np.r_[first[1:], v.size] - 1
  ranks = np.empty(v.size, dtype=np.float64)
  ranks[order] = (first + last)[run_id] / 2 + 1
  return ranks


def _as_binary(y: np.ndarray) -> np.ndarray:
  y = np.asarray(y)
  if y.dtype != bool and not np.isin(y, (0, 1)).all():
    raise ValueError("binary labels must be 0/1 or bool")
  return y.astype(bool)


def _check_same_length(a: np.ndarray, b: np.ndarray) -> None:
  if a.ndim != 1 or a.shape != b.shape:
    raise ValueError(f"expected two 1-D arrays of one length, got {a.shape} and {b.shape}")


# ---------------------------------------------------------------------------
# RSNA threshold protocol.
# ---------------------------------------------------------------------------


def stratified_folds(y: np.ndarray, n_splits: int = 10, seed: int = 0) -> np.ndarray:
  """Deterministic stratified assignment of samples to folds.

  Each class's members are shuffled with ``np.random.default_rng(seed)``
  (classes in sorted order, one generator for all), then dealt to folds
  round-robin.  The dealing continues where the previous class stopped, so
  fold sizes differ by at most one and every fold gets floor or ceil of
  n_c / n_splits members of each class c.

  Args:
    y: [N] class labels.
    n_splits: number of folds.
    seed: shuffling seed.

  Returns:
    int [N] fold id of each sample, in [0, n_splits).
  """
  y = np.asarray(y)
  if n_splits < 2:
    raise ValueError("n_splits must be >= 2")
  rng = np.random.default_rng(seed)
  folds = np.empty(y.shape[0], dtype=np.int64)
  dealt = 0
  for c in np.unique(y):
    members = rng.permutation(np.nonzero(y == c)[0])
    folds[members] = (dealt + np.arange(members.size)) % n_splits
    dealt += members.size
  return folds


def f1_per_threshold(y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """F1 at each threshold (positive when ``score >= threshold``)."""
  t = _as_binary(y_true)
  s = np.asarray(scores, dtype=np.float64)
  pred = s[None, :] >= np.asarray(thresholds, dtype=np.float64)[:, None]
  tp = (pred & t).sum(axis=1)
  fp = (pred & ~t).sum(axis=1)
  fn = (~pred & t).sum(axis=1)
  denom = 2 * tp + fp + fn
  return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def best_f1_threshold(y_true: np.ndarray, scores: np.ndarray, thresholds: np.ndarray = THRESHOLD_GRID) -> float:
  """The threshold with the highest F1; the smallest one among equals.

  Taking the first maximum (a plain argmax over the grid) puts the threshold
  at the low end of a plateau of equal F1, i.e. just above the largest
  training score it must reject; held-out scores above that count as positive.
  """
  f1 = f1_per_threshold(y_true, scores, thresholds)
  return float(np.asarray(thresholds)[int(np.argmax(f1))])


def threshold_cv(
  y_true: np.ndarray,
  scores: np.ndarray,
  n_splits: int = 10,
  seed: int = 0,
  thresholds: np.ndarray = THRESHOLD_GRID,
) -> dict[str, float | list[float]]:
  """ACC and F1 with a threshold tuned by stratified cross-validation.

  For each fold: pick the threshold maximising F1 on the other folds, apply it
  to this fold, score ACC and F1 there.  Results are the unweighted means over
  folds (and their population standard deviations).

  Args:
    y_true: [N] binary labels.
    scores: [N] probabilities of the positive class.
    n_splits: number of folds.
    seed: fold seed (see `stratified_folds`).
    thresholds: candidate thresholds.

  Returns:
    {"ACC", "F1", "ACC_std", "F1_std": float, "thresholds": per-fold list}.
  """
  t = _as_binary(y_true)
  s = np.asarray(scores, dtype=np.float64)
  _check_same_length(t, s)
  folds = stratified_folds(t, n_splits, seed)
  accs, f1s, chosen = [], [], []
  for fold in range(n_splits):
    test = folds == fold
    threshold = best_f1_threshold(t[~test], s[~test], thresholds)
    pred = s[test] >= threshold
    accs.append(accuracy(t[test], pred))
    f1s.append(f1_score(t[test], pred))
    chosen.append(threshold)
  return {
    "ACC": float(np.mean(accs)),
    "F1": float(np.mean(f1s)),
    "ACC_std": float(np.std(accs)),
    "F1_std": float(np.std(f1s)),
    "thresholds": chosen,
  }


def threshold_cv_baselines(y_true: np.ndarray, n_splits: int = 10, seed: int = 0) -> dict[str, float]:
  """What `threshold_cv` reports for two predictors that ignore the image.

  Scored on the same folds and averaged the same way as `threshold_cv`:

  * "ACC_majority": always predicting the class more frequent among all
    labels (positive on a tie);
  * "F1_all_positive": always predicting positive, the F1 that a threshold
    below every score reaches.
  """
  t = _as_binary(y_true)
  folds = stratified_folds(t, n_splits, seed)
  majority = bool(2 * t.sum() >= t.size)
  accs, f1s = [], []
  for fold in range(n_splits):
    test = folds == fold
    accs.append(accuracy(t[test], np.full(int(test.sum()), majority)))
    f1s.append(f1_score(t[test], np.ones(int(test.sum()), dtype=bool)))
  return {"ACC_majority": float(np.mean(accs)), "F1_all_positive": float(np.mean(f1s))}
