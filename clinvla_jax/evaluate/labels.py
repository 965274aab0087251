"""A dataset's own label names: their prompts, zero-shot over them, and classes read from them.

The generic evaluators (`evaluators.RetrievalEvaluator`) score zero-shot over the label names a manifest gives;
the prompts come from ``assets/prompts/label_prompts.json`` (see its "about").  Numpy only.
"""

from collections.abc import Callable, Mapping, Sequence
import csv
import json
import pathlib
from typing import Any, Optional

import numpy as np

from clinvla_jax.evaluate import metrics
from clinvla_jax.evaluate import retrieval
from clinvla_jax.evaluate import zeroshot

TextEmbedFn = Callable[[Sequence[str]], np.ndarray]

LABEL_PROMPTS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "prompts" / "label_prompts.json"


def load_label_prompts(path: Optional[str] = None) -> dict:
  return json.loads(pathlib.Path(path or LABEL_PROMPTS).read_text(encoding="utf-8"))


def label_prompts(label_names: Sequence[str], prompt_file: Optional[Mapping[str, Any]] = None) -> dict[str, list[str]]:
  """{label: prompts} for named labels (see the prompt file's "about")."""
  data = prompt_file or load_label_prompts()
  explicit = data.get("prompts", {})
  phrases = data.get("phrases", {})
  out = {}
  for name in label_names:
    if name in explicit:
      out[name] = list(explicit[name])
    else:
      phrase = phrases.get(name, name)
      out[name] = [t.format(label=phrase) for t in data["templates"]]
  return out


def positive_labels(labels: np.ndarray) -> np.ndarray:
  """bool [N, C]: value > 0 (uncertain -1, 0 and NaN are not positive)."""
  with np.errstate(invalid="ignore"):
    return np.nan_to_num(np.asarray(labels, np.float64), nan=0.0) > 0


def label_zero_shot(
  image_emb: np.ndarray,
  labels: np.ndarray,
  label_names: Sequence[str],
  text_embed_fn: TextEmbedFn,
  prompt_file: Optional[Mapping[str, Any]] = None,
  *,
  num_resamples: int = retrieval.BOOTSTRAP_RESAMPLES,
  seed: int = retrieval.BOOTSTRAP_SEED,
) -> dict[str, float]:
  """Zero-shot over a dataset's own label names.

  A study's prediction is the label whose prompts its image is most similar to, among the labels positive in at
  least one scored study: the majority baseline can only name those, and a label that no scored study has can
  never be a hit (the demo's held-out split lacks 5 of its 11 labels, which drew 15 of its 36 predictions).

  Returns:
    {"zero_shot/ACC": top-1 hit rate over studies with a positive label,
     "zero_shot/ACC_majority": the same hit rate for always predicting the
     label most often positive among those studies,
     "zero_shot/ACC_ci_low", "zero_shot/ACC_ci_high": 95 % bootstrap interval
     over those studies (``num_resamples`` 0: none),
     "zero_shot/BACC": balanced accuracy, the mean over labels of the hit rate among their positive studies (the
     minority labels weigh as much as the majority one), with "_chance" (a uniformly random candidate label),
     "_majority" and its interval,
     "zero_shot/AUC": mean one-vs-rest AUC over labels with both positive
     and negative studies, "zero_shot/AUC_chance": 0.5}; a metric without
    any eligible study is left out.
  """
  pos = positive_labels(labels)
  if pos.shape[1] != len(label_names):
    raise ValueError(f"{pos.shape[1]} label columns for {len(label_names)} names")
  prompts = label_prompts(label_names, prompt_file)
  class_emb = zeroshot.class_embeddings(prompts, text_embed_fn, label_names)
  _, cos = zeroshot.zero_shot_predict(image_emb, class_emb)
  results = {}
  labelled = pos.any(axis=1)
  if labelled.any():
    scored = pos[labelled]
    candidates = scored.any(axis=0)
    pred = np.where(candidates, cos[labelled], -np.inf).argmax(axis=1)
    hit = scored[np.arange(len(pred)), pred].astype(np.float64)
    results.update({f"zero_shot/{k}": v for k, v in metrics.summarize("ACC", hit, None, num_resamples, seed).items()})
    majority = metrics.majority_label_hits(scored).astype(np.float64)
    results["zero_shot/ACC_majority"] = float(majority.mean())
    baselines = {"chance": scored.sum(axis=1) / candidates.sum(), "majority": majority}
    balanced = metrics.balanced_summary("BACC", hit, scored, baselines, num_resamples, seed)
    results.update({f"zero_shot/{k}": v for k, v in balanced.items()})
  aucs = [metrics.roc_auc(pos[:, c], cos[:, c]) for c in range(pos.shape[1]) if 0 < pos[:, c].sum() < len(pos)]
  if aucs:
    results["zero_shot/AUC"] = float(np.mean(aucs))
    results["zero_shot/AUC_chance"] = 0.5
  return results


def class_names_of(labels: np.ndarray, label_names: Sequence[str], classes: Sequence[str]) -> np.ndarray:
  """[N] class of each row; exactly one of ``classes`` must be positive."""
  cols = [list(label_names).index(c) for c in classes]
  pos = positive_labels(labels)[:, cols]
  bad = np.flatnonzero(pos.sum(axis=1) != 1)
  if bad.size:
    raise ValueError(f"{bad.size} rows do not have exactly one of {classes} positive (first: row {bad[0]})")
  return np.asarray(classes)[pos.argmax(axis=1)]


def read_temporal_labels(path: str) -> dict[str, dict[str, str]]:
  """{finding: {study_id: label}} from a CSV with a study_id column."""
  with open(path, newline="", encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  if not rows or "study_id" not in rows[0]:
    raise ValueError(f"{path}: expected a study_id column")
  findings = [c for c in rows[0] if c != "study_id"]
  return {c: {r["study_id"]: r[c].strip() for r in rows if r[c].strip()} for c in findings}
