"""Tests of clinvla_jax.evaluate.retrieval."""

import numpy as np
import pytest

from clinvla_jax.evaluate import retrieval


def loop_precision(sim, rel, k, exclude_self=False):
  out = []
  for q in range(sim.shape[0]):
    gallery = [g for g in range(sim.shape[1]) if not (exclude_self and g == q)]
    ranked = sorted(gallery, key=lambda g: (-sim[q, g], g))
    out.append(sum(rel[q, g] for g in ranked[:k]) / k)
  return float(np.mean(out))


COMPANIONS = ("_chance", "_majority", "_ci_low", "_ci_high")


def scores_only(results):
  """The base scores, without their chance and interval companions."""
  return {k: v for k, v in results.items() if not k.endswith(COMPANIONS)}


def with_companions(keys):
  return set(keys) | {k + c for k in keys for c in COMPANIONS}


def normalized(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered(rng, labels, dim=16, noise=0.3):
  """Unit embeddings near one random prototype per class."""
  protos = normalized(rng.normal(size=(labels.max() + 1, dim)))
  return normalized(protos[labels] + noise * rng.normal(size=(labels.size, dim)))


def test_cosine_similarity_normalises():
  a = np.array([[3.0, 4.0]])
  b = np.array([[1.0, 0.0], [0.0, -2.0]])
  np.testing.assert_allclose(retrieval.cosine_similarity(a, b), [[0.6, -0.8]])


def test_generic_retrieval_matches_loop():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 4, 40)
  img = clustered(rng, labels, noise=1.0)
  txt = clustered(rng, labels, noise=1.0)
  got = retrieval.evaluate_retrieval(labels, img, txt, ks=(5, 10))
  rel = labels[:, None] == labels[None, :]
  sims = {"image_to_text": img @ txt.T, "text_to_image": txt @ img.T, "image_to_image": img @ img.T}
  for direction, sim in sims.items():
    for k in (5, 10):
      want = loop_precision(sim, rel, k, direction == "image_to_image")
      assert got[f"{direction}/P@{k}"] == pytest.approx(want)


def test_image_to_image_excludes_query_itself():
  # Six images per class: with the query removed, its five classmates fill
  # the top five; an identical other-class image shows self-exclusion matters.
  labels = np.repeat(np.arange(3), 6)
  protos = np.eye(3)
  img = protos[labels] + 1e-3 * np.arange(18)[:, None]
  got = retrieval.evaluate_retrieval(labels, image_emb=img, ks=(5, 6), directions=("image_to_image",))
  assert scores_only(got) == {"image_to_image/P@5": 1.0, "image_to_image/P@6": pytest.approx(5 / 6)}
  # Chance leaves the query out too: 5 classmates among 17 other images.
  assert got["image_to_image/P@5_chance"] == pytest.approx(5 / 17)


def test_multilabel_generic_retrieval():
  # Study 0 has findings A and B: relevant to both the A-only and B-only study.
  labels = np.array([[1, 1], [1, 0], [0, 1]], dtype=float)
  emb = np.eye(3)
  got = retrieval.evaluate_retrieval(labels, image_emb=emb, text_emb=emb, ks=(2,))
  # image->text: each query ranks its own report, then (tied scores, lowest
  # index first) the next study; both always share a finding with the query.
  assert got["image_to_text/P@2"] == 1.0
  # image->image without self: study 0 finds 1 and 2 (both relevant); study 1
  # finds 0 (shares A) and 2 (shares nothing); study 2 likewise.
  assert got["image_to_image/P@2"] == pytest.approx((1 + 1 / 2 + 1 / 2) / 3)


def test_missing_modality_is_skipped_and_bad_direction_rejected():
  labels = np.arange(6) % 2
  got = retrieval.evaluate_retrieval(labels, image_emb=np.eye(6), ks=(1,))
  assert set(got) == with_companions({"image_to_image/P@1"})
  with pytest.raises(ValueError):
    retrieval.evaluate_retrieval(labels, image_emb=np.eye(6), ks=(1,), directions=("text_to_text",))


def test_chexpert_5x200_keeps_own_report():
  # Each image equals its own report; other reports are random. If the own
  # report were dropped P@1 would fall well below 1.
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(5), 20)
  txt = normalized(rng.normal(size=(100, 32)))
  got = retrieval.chexpert_5x200_image_to_text(txt.copy(), txt, labels, ks=(1, 5, 100))
  assert got["image_to_text/P@1"] == 1.0
  # P@100 covers the whole gallery: exactly each class's share, 20 %.
  assert got["image_to_text/P@100"] == pytest.approx(0.2)
  assert set(got) == with_companions({"image_to_text/P@1", "image_to_text/P@5", "image_to_text/P@100"})
  assert got["image_to_text/P@5_chance"] == pytest.approx(0.2)


def test_chexpert_5x200_matches_loop_and_default_ks():
  rng = np.random.default_rng(2)
  labels = np.repeat(np.arange(5), 30)
  img = clustered(rng, labels, noise=1.5)
  txt = clustered(rng, labels, noise=1.5)
  got = retrieval.chexpert_5x200_image_to_text(img, txt, labels)
  rel = labels[:, None] == labels[None, :]
  for k in (5, 10, 100):
    assert got[f"image_to_text/P@{k}"] == pytest.approx(loop_precision(img @ txt.T, rel, k))


def test_align_rows():
  emb = np.arange(8).reshape(4, 2)
  out = retrieval.align_rows(["a", "b", "c", "d"], emb, ["c", "a"])
  np.testing.assert_array_equal(out, [[4, 5], [0, 1]])
  with pytest.raises(KeyError):
    retrieval.align_rows(["a", "b", "c", "d"], emb, ["z"])


def test_one_hot_classes():
  out = retrieval.one_hot_classes(["Edema", "No Finding"])
  assert out.shape == (2, 8)
  assert out[0, 2] == 1 and out[1, 0] == 1 and out.sum() == 2


def test_load_chexpert_8x200_lists(chexpert_8x200_dir):
  lists = retrieval.load_chexpert_8x200(chexpert_8x200_dir)
  assert len(lists.candidate_paths) == 1600
  assert len(lists.image_query_paths) == 80
  assert len(lists.text_queries) == 40
  # Exactly one positive class per candidate, 200 per class.
  np.testing.assert_array_equal(lists.candidate_labels.sum(axis=1), 1)
  np.testing.assert_array_equal(lists.candidate_labels.sum(axis=0), 200)
  for cls in retrieval.CHEXPERT_8X200_CLASSES:
    assert lists.image_query_classes.count(cls) == 10
    assert lists.text_query_classes.count(cls) == 5
  assert not set(lists.image_query_paths) & set(lists.candidate_paths)


def synthetic_8x200(rng, noise):
  """Small fake lists: 8 classes, 12 candidates and 2 queries each."""
  classes = retrieval.CHEXPERT_8X200_CLASSES
  cand_cls = np.repeat(np.arange(8), 12)
  q_cls = np.repeat(np.arange(8), 2)
  lists = retrieval.Chexpert8x200Lists(
    candidate_paths=tuple(f"c{i}" for i in range(cand_cls.size)),
    candidate_labels=retrieval.one_hot_classes([classes[c] for c in cand_cls]),
    image_query_paths=tuple(f"q{i}" for i in range(q_cls.size)),
    image_query_classes=tuple(classes[c] for c in q_cls),
    text_queries=tuple(f"text about {classes[c]} #{i}" for i, c in enumerate(q_cls)),
    text_query_classes=tuple(classes[c] for c in q_cls),
  )
  protos = normalized(rng.normal(size=(8, 24)))

  def embed(cls):
    return normalized(protos[cls] + noise * rng.normal(size=(cls.size, 24)))

  text_emb = dict(zip(lists.text_queries, embed(q_cls)))
  return lists, embed(cand_cls), embed(q_cls), (lambda texts: np.stack([text_emb[t] for t in texts]))


def test_chexpert_8x200_perfect_embeddings():
  lists, cand, queries, text_fn = synthetic_8x200(np.random.default_rng(3), 0.0)
  got = retrieval.chexpert_8x200(cand, queries, text_fn, lists, ks=(5, 10, 12))
  assert all(v == 1.0 for v in scores_only(got).values())
  assert len(scores_only(got)) == 6
  # 12 of the 96 candidates belong to each query's class.
  assert got["text_to_image/P@5_chance"] == pytest.approx(1 / 8)
  # One more than the class size: 12 of 13 can be right.
  got = retrieval.chexpert_8x200(cand, queries, None, lists, ks=(13,))
  assert scores_only(got) == {"image_to_image/P@13": pytest.approx(12 / 13)}


def test_chexpert_8x200_noisy_matches_loop():
  lists, cand, queries, text_fn = synthetic_8x200(np.random.default_rng(4), 1.2)
  got = retrieval.chexpert_8x200(cand, queries, text_fn, lists, ks=(5, 10))
  q_cls = np.array([retrieval.CHEXPERT_8X200_CLASSES.index(c) for c in lists.image_query_classes])
  rel = lists.candidate_labels[:, q_cls].T > 0
  text = text_fn(list(lists.text_queries))
  for k in (5, 10):
    assert got[f"image_to_image/P@{k}"] == pytest.approx(loop_precision(queries @ cand.T, rel, k))
    assert got[f"text_to_image/P@{k}"] == pytest.approx(loop_precision(text @ cand.T, rel, k))
  assert 0.0 < got["image_to_image/P@5"] < 1.0
