"""Exact top-k by inner product: one matrix product per block of queries, then a partial sort.

Rows and queries are unit vectors, so the inner product is the cosine
similarity.  Ties are broken by row number, so the ranking equals a stable
``argsort`` of the full score vector.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

# Score blocks of at most this many floats (256 MiB): 32 queries at a million rows.
_BLOCK_FLOATS = 1 << 26


def rank_rows(scores: np.ndarray, k: int) -> np.ndarray:
  """Row numbers of the ``k`` best scores of each query row of ``scores`` [Q, N], best first."""
  n = scores.shape[1]
  k = min(k, n)
  if k <= 0:
    return np.zeros((scores.shape[0], 0), np.int64)
  if k < n:
    cand = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  else:
    cand = np.broadcast_to(np.arange(n), scores.shape)
  cand_scores = np.take_along_axis(scores, cand, axis=1)
  # lexsort's last key is the primary one: score descending, then row ascending.
  order = np.lexsort((cand, -cand_scores), axis=1)
  return np.take_along_axis(cand, order, axis=1).astype(np.int64)


def top_k(
  rows: np.ndarray, queries: np.ndarray, k: int, valid: Optional[np.ndarray] = None
) -> tuple[np.ndarray, np.ndarray]:
  """(row numbers [Q, k'], scores [Q, k']) of the best rows per query; ``valid`` [N] excludes rows.

  ``k' = min(k, number of valid rows)``.
  """
  rows = np.asarray(rows, np.float32)
  queries = np.atleast_2d(np.asarray(queries, np.float32))
  if queries.shape[1] != rows.shape[1]:
    raise ValueError(f"queries have {queries.shape[1]} dimensions, the index rows {rows.shape[1]}")
  num_valid = rows.shape[0] if valid is None else int(np.count_nonzero(valid))
  k = max(0, min(int(k), num_valid))
  block = max(1, _BLOCK_FLOATS // max(1, rows.shape[0]))
  out_idx, out_scores = [], []
  for start in range(0, queries.shape[0], block):
    scores = queries[start : start + block] @ rows.T
    if valid is not None:
      scores[:, ~valid] = -np.inf
    idx = rank_rows(scores, k)
    out_idx.append(idx)
    out_scores.append(np.take_along_axis(scores, idx, axis=1))
  if not out_idx:
    return np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
  return np.concatenate(out_idx), np.concatenate(out_scores)
