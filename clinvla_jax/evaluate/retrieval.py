"""Retrieval evaluators on precomputed embeddings.

Similarity is the cosine of global embeddings (rows are re-normalised here, a
no-op for the model's outputs).  Ranking, tie-breaking and the P@K definition
are those of `clinvla_jax.evaluate.metrics` (stable sort by descending score,
ties by gallery index; P@K always divides by K).

Result dictionaries hold fractions in [0, 1], keyed by direction and metric:

  "<direction>/P@<K>"          mean P@K, e.g. "image_to_text/P@5"
  "<direction>/P@<K>_chance"   expected P@K of a uniformly random ranking
  "<direction>/P@<K>_majority" P@K of one ranking for every query, by the label
                               prior (`metrics.majority_precision_per_query`)
  "<direction>/P@<K>_ci_low"   95 % percentile bootstrap interval over
  "<direction>/P@<K>_ci_high"  queries (1000 resamples, seed 0 by default)

and, for the paired image<->report directions of `evaluate_retrieval`,
"<direction>/R@<K>" (the query's own item in the top K) with the same
"_chance" (K / gallery size), "_ci_low" and "_ci_high" companions.
"""

from collections.abc import Callable, Sequence
import csv
import dataclasses
import pathlib
from typing import Optional

import numpy as np

from clinvla_jax.evaluate import metrics

TextEmbedFn = Callable[[list[str]], np.ndarray]

CHEXPERT_8X200_CLASSES = (
  "No Finding",
  "Cardiomegaly",
  "Edema",
  "Pneumonia",
  "Atelectasis",
  "Pneumothorax",
  "Pleural Effusion",
  "Fracture",
)
CHEXPERT_8X200_KS = (5, 10, 50)
CHEXPERT_5X200_KS = (5, 10, 100)
DIRECTIONS = ("image_to_text", "text_to_image", "image_to_image")
PAIRED_DIRECTIONS = ("image_to_text", "text_to_image")
RECALL_KS = (1, 5, 10)
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


def cosine_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """float [Q, G] cosine similarities."""
  return _unit_rows(queries) @ _unit_rows(gallery).T


def _unit_rows(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def retrieval_precision(
  query_emb: np.ndarray,
  gallery_emb: np.ndarray,
  query_labels: np.ndarray,
  gallery_labels: np.ndarray,
  ks: Sequence[int],
  exclude_self: bool = False,
  prefix: str = "",
  *,
  num_resamples: int = BOOTSTRAP_RESAMPLES,
  seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
  """P@K of one query set against one gallery, with chance and interval.

  Returns:
    {"<prefix>P@K", "<prefix>P@K_chance", "<prefix>P@K_majority", "<prefix>P@K_ci_low",
     "<prefix>P@K_ci_high"} (see `metrics.precision_at_k_summary`;
    ``num_resamples`` 0 leaves out the interval).
  """
  sim = cosine_similarity(query_emb, gallery_emb)
  p = metrics.precision_at_k_summary(sim, query_labels, gallery_labels, ks, exclude_self, num_resamples, seed)
  return {f"{prefix}{k}": v for k, v in p.items()}


def retrieval_recall(
  query_emb: np.ndarray,
  gallery_emb: np.ndarray,
  ks: Sequence[int] = RECALL_KS,
  prefix: str = "",
  *,
  num_resamples: int = BOOTSTRAP_RESAMPLES,
  seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
  """Instance-level R@K of paired sets: row i's own item is gallery row i.

  Unlike P@K, which any item of the right class satisfies, R@K asks for the
  one paired report (or image), so it separates a model that matches studies
  from one that only sorts them into classes.

  Returns:
    {"<prefix>R@K": fraction of queries whose own item is in the top K,
     "<prefix>R@K_chance": K / G, "<prefix>R@K_ci_low", "<prefix>R@K_ci_high"}.
  """
  sim = cosine_similarity(query_emb, gallery_emb)
  hits = metrics.recall_at_k_per_query(sim, ks)
  out = {}
  for j, k in enumerate(ks):
    out.update(metrics.summarize(f"{prefix}R@{k}", hits[:, j], k / sim.shape[1], num_resamples, seed))
  return out


def paired_cosine_summary(image_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, float]:
  """Mean cosine of paired (row i, row i) and of all unpaired rows.

  A model that learned the pairing scores its own pairs well above the rest;
  an untrained one scores both alike.  The unpaired mean comes from the sums
  of the unit vectors, without forming the [N, N] matrix.

  Returns:
    {"paired": mean over i of cos(image_i, text_i),
     "unpaired": mean over i != j of cos(image_i, text_j)}; "unpaired" is
    NaN for a single pair.
  """
  if np.shape(image_emb) != np.shape(text_emb) or np.ndim(image_emb) != 2:
    raise ValueError(
      f"paired embeddings must share one [N, P] shape, got {np.shape(image_emb)} and {np.shape(text_emb)}"
    )
  a, b = _unit_rows(image_emb), _unit_rows(text_emb)
  n = a.shape[0]
  paired = np.sum(a * b, axis=1)
  total = float(a.sum(axis=0) @ b.sum(axis=0))
  unpaired = (total - paired.sum()) / (n * (n - 1)) if n > 1 else float("nan")
  return {"paired": float(paired.mean()), "unpaired": float(unpaired)}


# ---------------------------------------------------------------------------
# Generic labelled set.
# ---------------------------------------------------------------------------


def evaluate_retrieval(
  labels: np.ndarray,
  image_emb: Optional[np.ndarray] = None,
  text_emb: Optional[np.ndarray] = None,
  ks: Sequence[int] = (5, 10, 50),
  directions: Sequence[str] = DIRECTIONS,
  *,
  recall_ks: Sequence[int] = RECALL_KS,
  num_resamples: int = BOOTSTRAP_RESAMPLES,
  seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
  """Retrieval P@K and R@K within one labelled set of paired images and reports.

  Row i of ``image_emb`` and ``text_emb`` belong to the same study, whose
  labels are row i of ``labels``.  Every item is a query once, and the gallery
  is the whole set of the other (or same) modality:

  * image_to_text / text_to_image: the query's own paired item stays in the
    gallery (it is a fair hit, as in the CheXpert 5x200 protocol).
  * image_to_image: the query image is removed from its own ranking.

  Relevance is "shares a label" (see `metrics.relevance_matrix`): equal class
  id for [N] labels; at least one common positive label for [N, C] multi-hot
  labels, so a study with several findings is relevant to each of them.  A
  study without any positive label is relevant to nothing; give "No Finding"
  its own column to count normal studies.

  The paired directions (image_to_text, text_to_image) also get the
  instance-level R@K of `retrieval_recall` for each K of ``recall_ks``
  smaller than the set; a query's own item is the one hit there.

  Directions whose embeddings are missing are skipped.  Every score comes
  with its chance level and a bootstrap interval over queries
  (``num_resamples`` 0: none), see the module docstring.

  Returns:
    {"<direction>/P@<K>", "<direction>/R@<K>" and their "_chance", "_ci_low",
     "_ci_high" companions: fraction}.
  """
  unknown = set(directions) - set(DIRECTIONS)
  if unknown:
    raise ValueError(f"unknown retrieval directions {sorted(unknown)}")
  pairs = {
    "image_to_text": (image_emb, text_emb, False),
    "text_to_image": (text_emb, image_emb, False),
    "image_to_image": (image_emb, image_emb, True),
  }
  results = {}
  for direction in directions:
    queries, gallery, exclude_self = pairs[direction]
    if queries is None or gallery is None:
      continue
    results.update(
      retrieval_precision(
        queries, gallery, labels, labels, ks, exclude_self, f"{direction}/", num_resamples=num_resamples, seed=seed
      )
    )
    r_ks = [k for k in recall_ks if k < np.shape(gallery)[0]]
    if direction in PAIRED_DIRECTIONS and r_ks:
      results.update(retrieval_recall(queries, gallery, r_ks, f"{direction}/", num_resamples=num_resamples, seed=seed))
  return results


# ---------------------------------------------------------------------------
# CheXpert 5x200 (image -> text).
# ---------------------------------------------------------------------------


def chexpert_5x200_image_to_text(
  image_emb: np.ndarray,
  text_emb: np.ndarray,
  labels: np.ndarray,
  ks: Sequence[int] = CHEXPERT_5X200_KS,
  *,
  num_resamples: int = BOOTSTRAP_RESAMPLES,
  seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
  """CheXpert 5x200 image->report P@K.

  All 1000 images query all 1000 report impressions; a hit is a report of the
  same class; each image's own report stays in the gallery.

  Args:
    image_emb: [N, P] images.
    text_emb: [N, P] their reports, same row order.
    labels: [N] class of each study (one of five).
    ks: cut-offs (protocol: 5, 10, 100).
    num_resamples: bootstrap resamples of the interval (0: none).
    seed: bootstrap seed.

  Returns:
    {"image_to_text/P@K" and its "_chance", "_ci_low", "_ci_high": fraction}.
  """
  if np.shape(image_emb)[0] != np.shape(text_emb)[0]:
    raise ValueError("images and reports must be paired row by row")
  return retrieval_precision(
    image_emb, text_emb, labels, labels, ks, prefix="image_to_text/", num_resamples=num_resamples, seed=seed
  )


# ---------------------------------------------------------------------------
# CheXpert 8x200 (ConVIRT lists).
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chexpert8x200Lists:
  """The published ConVIRT evaluation lists.

  Attributes:
    candidate_paths: [1600] image paths of the gallery.
    candidate_labels: [1600, 8] labels over `CHEXPERT_8X200_CLASSES`
      (1 positive, 0 otherwise).
    image_query_paths: [80] query image paths.
    image_query_classes: [80] query class names.
    text_queries: [40] expert-written query sentences.
    text_query_classes: [40] their class names.
  """

  candidate_paths: tuple[str, ...]
  candidate_labels: np.ndarray
  image_query_paths: tuple[str, ...]
  image_query_classes: tuple[str, ...]
  text_queries: tuple[str, ...]
  text_query_classes: tuple[str, ...]


def _read_csv(path: pathlib.Path) -> list[dict[str, str]]:
  with open(path, newline="", encoding="utf-8") as f:
    return list(csv.DictReader(f))


def load_chexpert_8x200(list_dir: str | pathlib.Path) -> Chexpert8x200Lists:
  """Reads ``image-retrieval/`` and ``text-retrieval/`` CSVs from list_dir.

  A candidate label counts as positive only when its CSV value is exactly 1
  (blank, 0 and -1 do not).
  """
  root = pathlib.Path(list_dir)
  candidates = _read_csv(root / "image-retrieval" / "candidate.csv")
  image_queries = _read_csv(root / "image-retrieval" / "query.csv")
  text_queries = _read_csv(root / "text-retrieval" / "query.csv")

  def positive(value: str) -> float:
    return 1.0 if value.strip() and float(value) == 1.0 else 0.0

  labels = np.array([[positive(r[c]) for c in CHEXPERT_8X200_CLASSES] for r in candidates], dtype=np.float32)
  for q in image_queries + text_queries:
    if q["Variable"] not in CHEXPERT_8X200_CLASSES:
      raise ValueError(f"unknown 8x200 query class {q['Variable']!r}")
  return Chexpert8x200Lists(
    candidate_paths=tuple(r["Path"] for r in candidates),
    candidate_labels=labels,
    image_query_paths=tuple(r["Path"] for r in image_queries),
    image_query_classes=tuple(r["Variable"] for r in image_queries),
    text_queries=tuple(r["Text"] for r in text_queries),
    text_query_classes=tuple(r["Variable"] for r in text_queries),
  )


def one_hot_classes(class_names: Sequence[str], columns: Sequence[str] = CHEXPERT_8X200_CLASSES) -> np.ndarray:
  """float [N, C] with a single 1 at each name's column."""
  index = {c: i for i, c in enumerate(columns)}
  out = np.zeros((len(class_names), len(columns)), dtype=np.float32)
  out[np.arange(len(class_names)), [index[n] for n in class_names]] = 1.0
  return out


def align_rows(ids: Sequence[str], emb: np.ndarray, wanted: Sequence[str]) -> np.ndarray:
  """Rows of ``emb`` reordered from ``ids`` order to ``wanted`` order.

  Lets an embedding run process images in any order (or a superset of them).
  Raises KeyError naming the first missing id.
  """
  emb = np.asarray(emb)
  if len(ids) != emb.shape[0]:
    raise ValueError(f"{len(ids)} ids for {emb.shape[0]} rows")
  where = {i: n for n, i in enumerate(ids)}
  missing = [w for w in wanted if w not in where]
  if missing:
    raise KeyError(f"{len(missing)} ids have no embedding, e.g. {missing[0]!r}")
  return emb[[where[w] for w in wanted]]


def chexpert_8x200(
  candidate_emb: np.ndarray,
  image_query_emb: Optional[np.ndarray],
  text_embed_fn: Optional[TextEmbedFn],
  lists: Chexpert8x200Lists,
  ks: Sequence[int] = CHEXPERT_8X200_KS,
  *,
  num_resamples: int = BOOTSTRAP_RESAMPLES,
  seed: int = BOOTSTRAP_SEED,
) -> dict[str, float]:
  """CheXpert 8x200 image->image and text->image P@K.

  The query images are not among the candidates, so nothing is excluded.  A
  candidate is relevant to a query when its label for the query's class is 1.

  Args:
    candidate_emb: [1600, P] candidate images in ``lists.candidate_paths``
      order (see `align_rows`).
    image_query_emb: [80, P] query images in ``lists.image_query_paths``
      order, or None to skip image->image.
    text_embed_fn: list of strings -> [N, P] text embeddings, or None to skip
      text->image.
    lists: the evaluation lists.
    ks: cut-offs (protocol: 5, 10, 50).
    num_resamples: bootstrap resamples of the interval (0: none).
    seed: bootstrap seed.

  Returns:
    {"image_to_image/P@K", "text_to_image/P@K" and their "_chance",
     "_ci_low", "_ci_high": fraction}.
  """
  results = {}
  if image_query_emb is not None:
    results.update(
      retrieval_precision(
        image_query_emb,
        candidate_emb,
        one_hot_classes(lists.image_query_classes),
        lists.candidate_labels,
        ks,
        prefix="image_to_image/",
        num_resamples=num_resamples,
        seed=seed,
      )
    )
  if text_embed_fn is not None:
    text_emb = np.asarray(text_embed_fn(list(lists.text_queries)))
    results.update(
      retrieval_precision(
        text_emb,
        candidate_emb,
        one_hot_classes(lists.text_query_classes),
        lists.candidate_labels,
        ks,
        prefix="text_to_image/",
        num_resamples=num_resamples,
        seed=seed,
      )
    )
  return results


def usable_ks(ks: Sequence[int], num_items: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(kept, skipped) cut-offs: K must be below the set size.

  Image->image search leaves the query out, so N - 1 items are rankable.
  """
  kept = tuple(int(k) for k in ks if 1 <= k <= num_items - 1)
  skipped = tuple(int(k) for k in ks if k not in kept)
  return kept, skipped
