"""Retrieval evaluators on precomputed embeddings.

Similarity is the cosine of global embeddings (rows are re-normalised here, a
no-op for the model's outputs).  Ranking, tie-breaking and the P@K definition
are those of `clinvla_jax.evaluate.metrics` (stable sort by descending score,
ties by gallery index; P@K always divides by K).

Result dictionaries are keyed "<direction>/P@<K>", e.g. "image_to_text/P@5",
with fractions in [0, 1].
"""

from collections.abc import Callable, Sequence
import csv
import dataclasses
import pathlib
from typing import Optional

import numpy as np

from clinvla_jax.evaluate import metrics

TextEmbedFn = Callable[[list[str]], np.ndarray]

CHEXPERT_8X200_CLASSES = ("No Finding", "Cardiomegaly", "Edema", "Pneumonia",
                          "Atelectasis", "Pneumothorax", "Pleural Effusion",
                          "Fracture")
CHEXPERT_8X200_KS = (5, 10, 50)
CHEXPERT_5X200_KS = (5, 10, 100)
DIRECTIONS = ("image_to_text", "text_to_image", "image_to_image")


def cosine_similarity(queries: np.ndarray, gallery: np.ndarray) -> np.ndarray:
  """float [Q, G] cosine similarities."""
  q = np.asarray(queries, dtype=np.float64)
  g = np.asarray(gallery, dtype=np.float64)
  q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
  g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
  return q @ g.T


def retrieval_precision(query_emb: np.ndarray,
                        gallery_emb: np.ndarray,
                        query_labels: np.ndarray,
                        gallery_labels: np.ndarray,
                        ks: Sequence[int],
                        exclude_self: bool = False,
                        prefix: str = "") -> dict[str, float]:
  """{"<prefix>P@K": mean precision} for one query set against one gallery."""
  sim = cosine_similarity(query_emb, gallery_emb)
  p = metrics.precision_at_k(sim, query_labels, gallery_labels, ks,
                             exclude_self)
  return {f"{prefix}P@{k}": v for k, v in p.items()}


# ---------------------------------------------------------------------------
# Generic labelled set.
# ---------------------------------------------------------------------------


def evaluate_retrieval(labels: np.ndarray,
                       image_emb: Optional[np.ndarray] = None,
                       text_emb: Optional[np.ndarray] = None,
                       ks: Sequence[int] = (5, 10, 50),
                       directions: Sequence[str] = DIRECTIONS
                       ) -> dict[str, float]:
  """Retrieval P@K within one labelled set of paired images and reports.

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

  Directions whose embeddings are missing are skipped.

  Returns:
    {"<direction>/P@<K>": fraction}.
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
    results.update(retrieval_precision(queries, gallery, labels, labels, ks,
                                       exclude_self, f"{direction}/"))
  return results


# ---------------------------------------------------------------------------
# CheXpert 5x200 (image -> text).
# ---------------------------------------------------------------------------


def chexpert_5x200_image_to_text(image_emb: np.ndarray,
                                 text_emb: np.ndarray,
                                 labels: np.ndarray,
                                 ks: Sequence[int] = CHEXPERT_5X200_KS
                                 ) -> dict[str, float]:
  """CheXpert 5x200 image->report P@K.

  All 1000 images query all 1000 report impressions; a hit is a report of the
  same class; each image's own report stays in the gallery.

  Args:
    image_emb: [N, P] images.
    text_emb: [N, P] their reports, same row order.
    labels: [N] class of each study (one of five).
    ks: cut-offs (protocol: 5, 10, 100).

  Returns:
    {"image_to_text/P@K": fraction}.
  """
  if np.shape(image_emb)[0] != np.shape(text_emb)[0]:
    raise ValueError("images and reports must be paired row by row")
  return retrieval_precision(image_emb, text_emb, labels, labels, ks,
                             prefix="image_to_text/")


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

  labels = np.array([[positive(r[c]) for c in CHEXPERT_8X200_CLASSES]
                     for r in candidates], dtype=np.float32)
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


def one_hot_classes(class_names: Sequence[str],
                    columns: Sequence[str] = CHEXPERT_8X200_CLASSES
                    ) -> np.ndarray:
  """float [N, C] with a single 1 at each name's column."""
  index = {c: i for i, c in enumerate(columns)}
  out = np.zeros((len(class_names), len(columns)), dtype=np.float32)
  out[np.arange(len(class_names)), [index[n] for n in class_names]] = 1.0
  return out


def align_rows(ids: Sequence[str], emb: np.ndarray,
               wanted: Sequence[str]) -> np.ndarray:
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


def chexpert_8x200(candidate_emb: np.ndarray,
                   image_query_emb: Optional[np.ndarray],
                   text_embed_fn: Optional[TextEmbedFn],
                   lists: Chexpert8x200Lists,
                   ks: Sequence[int] = CHEXPERT_8X200_KS) -> dict[str, float]:
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

  Returns:
    {"image_to_image/P@K", "text_to_image/P@K": fraction}.
  """
  results = {}
  if image_query_emb is not None:
    results.update(retrieval_precision(
        image_query_emb, candidate_emb,
        one_hot_classes(lists.image_query_classes), lists.candidate_labels,
        ks, prefix="image_to_image/"))
  if text_embed_fn is not None:
    text_emb = np.asarray(text_embed_fn(list(lists.text_queries)))
    results.update(retrieval_precision(
        text_emb, candidate_emb,
        one_hot_classes(lists.text_query_classes), lists.candidate_labels,
        ks, prefix="text_to_image/"))
  return results
