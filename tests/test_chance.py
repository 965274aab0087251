"""Chance levels, bootstrap intervals and instance recall of the evaluation.

Every score in results.json comes with what a model that learned nothing
would get and how much it moves over the queries; these tests pin down both
against closed forms, Monte-Carlo averages and independent references.
"""

import json

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from clinvla_jax.evaluate import metrics
from clinvla_jax.evaluate import report
from clinvla_jax.evaluate import retrieval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def normalized(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------
# Chance level of P@K.
# --------------------------------------------------------------------------


def test_chance_closed_form_hand_made():
  # Gallery classes 0 0 1 1 1: a class-0 query has 2 of 5 relevant items, a
  # class-1 query 3 of 5.
  rel = metrics.relevance_matrix(np.array([0, 1]), np.array([0, 0, 1, 1, 1]))
  np.testing.assert_allclose(metrics.chance_precision_per_query(rel), [2 / 5, 3 / 5])
  # Query = gallery, itself left out: labels 0 0 0 1.  Query 0 sees 2 of 3
  # other items relevant, query 3 none of 3.
  labels = np.array([0, 0, 0, 1])
  rel = metrics.relevance_matrix(labels, labels)
  np.testing.assert_allclose(metrics.chance_precision_per_query(rel, np.arange(4)), [2 / 3, 2 / 3, 2 / 3, 0.0])
  out = metrics.precision_at_k_summary(np.eye(4), labels, labels, ks=(1, 3), exclude_self=True, num_resamples=0)
  # The same chance for every K, and no interval keys without resamples.
  assert out["P@1_chance"] == out["P@3_chance"] == pytest.approx(0.5)
  assert set(out) == {"P@1", "P@3", "P@1_chance", "P@3_chance", "P@1_majority", "P@3_majority"}
  # The label prior ranks items 0, 1, 2 (each relevant to 2 other queries) before 3; each query skips itself.
  # Query 0's list is 1 2 3, query 3's is 0 1 2: P@1 = 1, 1, 1, 0 and P@3 = 2/3, 2/3, 2/3, 0.
  assert out["P@1_majority"] == pytest.approx(0.75) and out["P@3_majority"] == pytest.approx(0.5)


def test_majority_precision_is_the_best_ranking_that_ignores_the_query():
  """Against every fixed list of K items, on random multi-label relevance (no self exclusion)."""
  import itertools

  rng = np.random.default_rng(0)
  for trial in range(20):
    q_labels = (rng.random((7, 3)) < 0.4).astype(float)
    g_labels = (rng.random((6, 3)) < 0.4).astype(float)
    rel = metrics.relevance_matrix(q_labels, g_labels)
    for k in (1, 2, 3):
      best = max(rel[:, list(items)].mean() for items in itertools.combinations(range(6), k))
      got = metrics.majority_precision_per_query(rel, (k,)).mean()
      assert got == pytest.approx(best), (trial, k)


def test_chance_multilabel_hand_made():
  q = np.array([[1, 0], [0, 1]], dtype=float)
  g = np.array([[1, 1], [1, 0], [0, 0], [-1, 1]], dtype=float)
  rel = metrics.relevance_matrix(q, g)
  # Uncertain (-1) never counts: query 0 matches rows 0, 1; query 1 rows 0, 3.
  np.testing.assert_allclose(metrics.chance_precision_per_query(rel), [0.5, 0.5])


@pytest.mark.parametrize("exclude_self", [False, True])
def test_chance_is_mean_precision_of_random_rankings(exclude_self):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 12)
  rel = metrics.relevance_matrix(labels, labels)
  exclude = np.arange(12) if exclude_self else None
  chance = metrics.chance_precision_per_query(rel, exclude)
  # Continuous random scores rank the gallery by a uniform random
  # permutation; each trial is one more block of queries.
  trials = 4000
  sim = rng.random((trials * 12, 12))
  per_query = metrics.precision_at_k_per_query(
    sim, np.tile(rel, (trials, 1)), ks=(1, 4, 11), exclude_index=None if exclude is None else np.tile(exclude, trials)
  )
  mc = per_query.reshape(trials, 12, 3).mean(axis=0)
  # Standard error of a P@1 mean over 4000 trials is below 0.008.
  np.testing.assert_allclose(mc, np.repeat(chance[:, None], 3, axis=1), atol=0.03)
  np.testing.assert_allclose(mc.mean(axis=0), chance.mean(), atol=0.01)


def test_every_retrieval_p_at_k_has_chance_and_interval():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, 40)
  img = normalized(rng.normal(size=(40, 8)))
  txt = normalized(rng.normal(size=(40, 8)))
  got = retrieval.evaluate_retrieval(labels, img, txt, ks=(5, 10))
  rel = labels[:, None] == labels[None, :]
  for direction in retrieval.DIRECTIONS:
    exclude = np.arange(40) if direction == "image_to_image" else None
    want = metrics.chance_precision_per_query(rel, exclude).mean()
    for k in (5, 10):
      key = f"{direction}/P@{k}"
      assert got[f"{key}_chance"] == pytest.approx(want)
      assert got[f"{key}_ci_low"] <= got[key] <= got[f"{key}_ci_high"]


# --------------------------------------------------------------------------
# Bootstrap intervals.
# --------------------------------------------------------------------------


def test_bootstrap_ci_contains_mean_and_is_deterministic():
  rng = np.random.default_rng(2)
  x = (rng.random(300) < 0.4).astype(float)
  low, high = metrics.bootstrap_ci(x)
  assert low <= x.mean() <= high
  assert (low, high) == metrics.bootstrap_ci(x, 1000, 0)
  assert (low, high) != metrics.bootstrap_ci(x, 1000, 1)
  # A constant score has no spread.
  assert metrics.bootstrap_ci(np.full(10, 0.3)) == pytest.approx((0.3, 0.3))


def test_bootstrap_ci_narrows_with_more_queries():
  rng = np.random.default_rng(3)
  widths = []
  for n in (40, 400, 4000):
    low, high = metrics.bootstrap_ci((rng.random(n) < 0.4).astype(float))
    widths.append(high - low)
  assert widths[0] > widths[1] > widths[2] > 0
  # The width of a mean shrinks like 1 / sqrt(n): about 3.2x per 10x.
  assert widths[0] / widths[2] == pytest.approx(10.0, rel=0.3)


def test_bootstrap_ci_matches_scipy_percentile_bootstrap():
  rng = np.random.default_rng(4)
  x = rng.random(500)
  ours = metrics.bootstrap_ci(x, 2000, 0)
  ref = stats.bootstrap((x,), np.mean, n_resamples=2000, method="percentile", random_state=0).confidence_interval
  # Different draws: agreement within Monte-Carlo error of the percentiles.
  assert ours == pytest.approx((ref.low, ref.high), abs=0.005)


def test_bootstrap_columns_share_resamples():
  rng = np.random.default_rng(5)
  x = rng.random((50, 3))
  low, high = metrics.bootstrap_ci(x, 200, 7)
  assert low.shape == high.shape == (3,)
  for j in range(3):
    assert (low[j], high[j]) == pytest.approx(metrics.bootstrap_ci(x[:, j], 200, 7), abs=1e-12)
  with pytest.raises(ValueError):
    metrics.bootstrap_ci(x, 0)


# --------------------------------------------------------------------------
# Instance recall R@K.
# --------------------------------------------------------------------------


def loop_recall(sim, k):
  hits = []
  for q in range(sim.shape[0]):
    ranked = sorted(range(sim.shape[1]), key=lambda g: (-sim[q, g], g))
    hits.append(q in ranked[:k])
  return np.array(hits, dtype=float)


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_loop_with_ties(seed):
  rng = np.random.default_rng(seed)
  sim = np.round(rng.uniform(-1, 1, (30, 30)), 1)  # many ties
  ks = (1, 5, 10, 30)
  got = metrics.recall_at_k_per_query(sim, ks)
  for j, k in enumerate(ks):
    np.testing.assert_array_equal(got[:, j], loop_recall(sim, k))
  # The rank agrees with the full ranking of `rank_gallery`.
  order = metrics.rank_gallery(sim)
  np.testing.assert_array_equal(metrics.rank_of(sim, np.arange(30)), np.argmax(order == np.arange(30)[:, None], 1) + 1)


def test_recall_matches_sklearn_top_k_accuracy():
  rng = np.random.default_rng(2)
  n = 40
  sim = rng.normal(size=(n, n)) + 1.5 * np.eye(n)  # no ties
  got = metrics.recall_at_k_per_query(sim, (1, 5, 10)).mean(axis=0)
  want = [skm.top_k_accuracy_score(np.arange(n), sim, k=k, labels=np.arange(n)) for k in (1, 5, 10)]
  np.testing.assert_allclose(got, want)


def test_recall_keys_chance_and_random_level():
  rng = np.random.default_rng(6)
  n = 20
  labels = rng.integers(0, 3, n)
  img = normalized(rng.normal(size=(n, 8)))
  got = retrieval.evaluate_retrieval(labels, img, img.copy(), ks=(5,), recall_ks=(1, 5, 10, 20))
  for direction in retrieval.PAIRED_DIRECTIONS:
    # Identical embeddings: the own item is always first.  K = N is left out.
    for k in (1, 5, 10):
      assert got[f"{direction}/R@{k}"] == 1.0
      assert got[f"{direction}/R@{k}_chance"] == pytest.approx(k / n)
      assert got[f"{direction}/R@{k}_ci_low"] == 1.0
    assert f"{direction}/R@20" not in got
  assert not any("image_to_image/R@" in k for k in got)
  # Random scores hit the own item at rate K / N.
  trials = 200
  sim = rng.random((trials * n, n))
  target = np.tile(np.arange(n), trials)
  hits = metrics.recall_at_k_per_query(sim, (5,), target)
  assert hits.mean() == pytest.approx(5 / n, abs=0.02)


def test_paired_cosine_summary_matches_matrix():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(9, 5)), rng.normal(size=(9, 5))
  cos = retrieval.cosine_similarity(a, b)
  got = retrieval.paired_cosine_summary(a, b)
  assert got["paired"] == pytest.approx(np.diag(cos).mean())
  assert got["unpaired"] == pytest.approx(cos[~np.eye(9, dtype=bool)].mean())


# --------------------------------------------------------------------------
# Zero-shot baselines.
# --------------------------------------------------------------------------


def test_majority_baselines_hand_made():
  pos = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1]], dtype=bool)
  # Label 1 is positive in three studies; predicting it hits rows 1, 2, 3.
  np.testing.assert_array_equal(metrics.majority_label_hits(pos), [False, True, True, True])
  assert metrics.majority_accuracy(np.array(["a", "b", "b", "c", "b"])) == 0.6
  y = np.array([1, 0, 0, 0] * 5)
  base = metrics.threshold_cv_baselines(y, n_splits=5)
  # Every fold holds one positive and three negatives.
  assert base["ACC_majority"] == pytest.approx(0.75)
  assert base["F1_all_positive"] == pytest.approx(2 * 1 / (2 * 1 + 3))


def test_label_zero_shot_majority_and_auc_chance():
  from clinvla_jax.evaluate import labels as labels_lib  # pylint: disable=g-import-not-at-top

  names = ["A", "B", "C"]
  text = {n: row for n, row in zip(names, np.eye(3))}
  text_fn = lambda prompts: np.stack([text[p] for p in prompts])
  labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [0, 1, 1]])
  # Images point at A, A, C, B, C: hits for rows 0, 1 and 4 (3 of the 4
  # labelled studies); the unlabelled row 3 does not count.
  images = np.eye(3)[[0, 0, 2, 1, 2]]
  out = labels_lib.label_zero_shot(images, labels, names, text_fn, {"templates": ["{label}"]})
  assert out["zero_shot/ACC"] == pytest.approx(3 / 4)
  # B is positive in three of the four labelled studies, all hits.
  assert out["zero_shot/ACC_majority"] == pytest.approx(3 / 4)
  assert out["zero_shot/AUC_chance"] == 0.5
  assert out["zero_shot/ACC_ci_low"] <= out["zero_shot/ACC"] <= out["zero_shot/ACC_ci_high"]
  # Balanced: A's positives (rows 0, 1) all hit, B's (1, 2, 4) two of three, C's (4) its one.
  assert out["zero_shot/BACC"] == pytest.approx((1 + 2 / 3 + 1) / 3)
  # A uniformly random label hits a study with k positives k/3 of the time; always B hits every B study.
  assert out["zero_shot/BACC_chance"] == pytest.approx((1 / 2 + 5 / 9 + 2 / 3) / 3)
  assert out["zero_shot/BACC_majority"] == pytest.approx((1 / 2 + 1 + 1) / 3)
  assert out["zero_shot/BACC_ci_low"] <= out["zero_shot/BACC"] <= out["zero_shot/BACC_ci_high"]


def test_label_zero_shot_never_predicts_a_label_no_scored_study_has():
  from clinvla_jax.evaluate import labels as labels_lib  # pylint: disable=g-import-not-at-top

  names = ["A", "B", "absent"]
  text = {n: row for n, row in zip(names, np.eye(3))}
  text_fn = lambda prompts: np.stack([text[p] for p in prompts])
  labels = np.array([[1, 0, 0], [0, 1, 0], [0, 1, 0]])
  # Row 1 is closest to the label no study has, then to B.
  images = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 1.0], [0.2, 0.1, 0.9]])
  out = labels_lib.label_zero_shot(images, labels, names, text_fn, {"templates": ["{label}"]}, num_resamples=0)
  assert out["zero_shot/ACC"] == pytest.approx(2 / 3)  # rows 0 and 1 hit; row 2 falls to A, a miss
  assert out["zero_shot/BACC"] == pytest.approx((1 + 1 / 2) / 2)
  assert out["zero_shot/BACC_chance"] == pytest.approx(1 / 2)  # two candidate labels, one positive each


# --------------------------------------------------------------------------
# Tables and figures.
# --------------------------------------------------------------------------


def test_other_results_markdown_renders_chance_and_interval():
  from clinvla_jax.evaluate import run  # pylint: disable=g-import-not-at-top

  results = {
    "covid_cxr/image_to_text/P@5": 0.472,
    "covid_cxr/image_to_text/P@5_ci_low": 0.401,
    "covid_cxr/image_to_text/P@5_ci_high": 0.54,
    "covid_cxr/image_to_text/P@5_chance": 0.34,
    "covid_cxr/image_to_text/R@1": 0.1,
    "covid_cxr/image_to_text/R@1_chance": 0.05,
    "covid_cxr/image_to_text/P@10": 0.4,
    "covid_cxr/zero_shot/ACC": 0.5,
    "covid_cxr/zero_shot/ACC_majority": 0.45,
    "covid_cxr/zero_shot/AUC": 0.61,
    "covid_cxr/zero_shot/AUC_chance": 0.5,
    # Shown by the paper tables, companions included.
    "chexpert_8x200/image_to_image/P@5": 0.3,
    "chexpert_8x200/image_to_image/P@5_chance": 0.125,
  }
  text = run.other_results_markdown(results, ["a note"])
  assert "| Task | P@5 | P@10 | R@1 | ACC | AUC |" in text
  assert (
    "| image_to_text | 47.2 [40.1\u201354.0] \u00b7 chance 34.0 | 40.0 |"
    " 10.0 \u00b7 chance 5.0 | \u2014 | \u2014 |" in text
  )
  assert "| zero_shot | \u2014 | \u2014 | \u2014 | 50.0 \u00b7 majority 45.0 | 61.0 \u00b7 chance 50.0 |" in text
  assert "chexpert_8x200" not in text and "- a note" in text
  # The paper tables print our chance level under the table.
  paper = report.markdown_report(results)
  assert "CheXpert 8x200 I\u2192I P@5 12.5" in paper


def test_score_cell_and_split_metric():
  assert report.split_metric("P@5_ci_low") == ("P@5", "ci_low")
  assert report.split_metric("F1_all_positive") == ("F1", "all_positive")
  assert report.split_metric("AUC") == ("AUC", "")
  assert report.score_cell({"ACC": 0.8, "ACC_std": 0.01}, "ACC") == "80.0 \u00b1 1.0"
  assert report.score_cell({}, "ACC") == report.MISSING


def test_retrieval_captions_and_figure(tmp_path):
  captions = report.retrieval_captions(
    np.array([0.2, 0.25, 0.21]), np.array([0.1, 0.3, 0.3, 0.5]), 2, {"paired": 0.4, "unpaired": 0.1}
  )
  assert "span 0.0500" in captions[0]
  # Own report 2 ties with 1 and comes after it: rank 3 of 4.
  assert "ranked 3 of 4" in captions[1]
  assert "paired 0.4000 vs. unpaired 0.1000" in captions[1]
  rng = np.random.default_rng(0)
  hits = report.top_hits(rng.random(3), [rng.random((16, 16))] * 3, k=3)
  report_hits = report.top_hits(rng.random(3), ["a", "b", "c"], k=3)
  path = report.retrieval_figure(
    tmp_path / "fig.png",
    text_query="q",
    image_hits=hits,
    image_query=rng.random((16, 16)),
    report_hits=report_hits,
    t2i_caption=captions[0],
    i2t_caption=captions[1],
  )
  assert path.read_bytes()[:8] == PNG_MAGIC


def write_jsonl(path, records, tail=""):
  path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
  return path


def training_lines(steps, offset=0.0):
  return [
    {"step": s, "loss": 2.0 / s + offset, "loss_global": 1.0 / s, "loss_local": 1.0 / s + offset, "learning_rate": 1e-4}
    for s in steps
  ]


def test_learning_curves_without_eval_lines(tmp_path):
  log = write_jsonl(tmp_path / "metrics.jsonl", training_lines(range(1, 30)))
  path = report.learning_curves_figure(log, tmp_path / "out" / "curves.png")
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 10_000
  # An empty log (nothing written yet) still gives a figure.
  empty = write_jsonl(tmp_path / "empty.jsonl", [])
  assert report.learning_curves_figure(empty, tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC


def test_learning_curves_with_eval_and_resumed_run(tmp_path):
  key = "eval/covid_cxr/image_to_text/P@5"
  records = training_lines(range(1, 21))
  for step in (10, 20):
    records.append(
      {
        "step": step,
        key: step / 100,
        f"{key}_chance": 0.34,
        f"{key}_ci_low": step / 100 - 0.05,
        f"{key}_ci_high": step / 100 + 0.05,
        "eval/covid_cxr/text_to_image/R@5": 0.2,
        "eval/covid_cxr/text_to_image/R@5_chance": 0.38,
      }
    )
  # Resumed from step 15: steps 16-20 are logged again, with other values,
  # and the last line was cut short by a crash.
  records += training_lines(range(16, 21), offset=5.0)
  records.append({"step": 20, key: 0.3, f"{key}_chance": 0.34, f"{key}_majority": 0.61})
  log = write_jsonl(tmp_path / "metrics.jsonl", records, tail='{"step": 2')
  series = report.read_metrics_jsonl(log)
  assert series["loss_local"][18] == pytest.approx(1 / 18 + 5.0)
  assert series["loss_global"][18] == pytest.approx(1 / 18)
  assert series[key] == {10: 0.1, 20: 0.3}
  assert series[f"{key}_ci_low"][20] == pytest.approx(0.15)
  # The reference lines come from the latest evaluation; a score logged without them gets none.
  assert report.baseline_levels(series, key) == {"chance": 0.34, "majority": 0.61}
  assert report.baseline_levels(series, "eval/covid_cxr/text_to_image/R@5") == {"chance": 0.38}
  assert report.baseline_levels(series, "eval/covid_cxr/absent/P@5") == {}
  path = report.learning_curves_figure(log, tmp_path / "curves.png")
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and len(data) > 10_000
  # Keys may be named without the "eval/" prefix.
  chosen = report.learning_curves_figure(log, tmp_path / "chosen.png", metric_keys=["covid_cxr/text_to_image/R@5"])
  assert chosen.read_bytes()[:8] == PNG_MAGIC
