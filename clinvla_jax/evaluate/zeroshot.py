"""Zero-shot classification with text prompts, and a linear probe.

Nothing here runs the model.  Text enters through ``text_embed_fn``, a
callable mapping a list of N strings to a float array [N, P] of global text
embeddings; images enter as precomputed global embeddings [M, P].

Prompt text lives in ``clinvla_jax/assets/prompts/`` (see its SOURCE.md).

Each zero-shot score comes with what an image-blind predictor scores on the
same labels ("ACC_majority": always the majority class; "F1_all_positive":
always positive; "AUC_chance": 0.5), so a reader can tell whether the model
beats the class balance.
"""

from collections.abc import Callable, Mapping, Sequence
import itertools
import json
import pathlib
from typing import Any, Optional

import numpy as np

from clinvla_jax.evaluate import metrics

TextEmbedFn = Callable[[list[str]], np.ndarray]

PROMPTS_DIR = pathlib.Path(__file__).resolve().parent.parent / "assets" / "prompts"
CHEXPERT_5X200_PROMPTS = "chexpert_5x200_prompt_parts.json"
PNEUMONIA_PROMPTS = "pneumonia_prompts.json"
CHEXPERT_5X200_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def load_prompt_file(name: str, prompts_dir: Optional[pathlib.Path] = None) -> dict:
  """Reads one prompt JSON file from the bundled prompt folder (or another)."""
  path = pathlib.Path(prompts_dir or PROMPTS_DIR) / name
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  norm = np.linalg.norm(x, axis=axis, keepdims=True)
  return x / np.maximum(norm, 1e-12)


# ---------------------------------------------------------------------------
# Prompts.
# ---------------------------------------------------------------------------


def join_prompt(parts: Sequence[str]) -> str:
  """Joins prompt parts with single spaces, dropping empty parts."""
  return " ".join(" ".join(parts).split())


def combine_prompt_parts(
  groups: Sequence[Sequence[str]], max_prompts: Optional[int] = None, seed: int = 0
) -> list[str]:
  """Every prompt formed by one entry of each group, in product order.

  Duplicate entries in the groups give duplicate prompts; they are kept, since
  the published protocol averages over the combinations as listed.

  Args:
    groups: the word groups of one class.
    max_prompts: if set and smaller than the number of combinations, keep a
      uniform sample of this many combinations without replacement, drawn with
      ``np.random.default_rng(seed)`` and returned in product order.  GLoRIA
      samples prompts this way; ALTA and the default here use all of them.
    seed: sampling seed.

  Returns:
    The prompts.
  """
  prompts = [join_prompt(p) for p in itertools.product(*groups)]
  if max_prompts is not None and max_prompts < len(prompts):
    keep = np.random.default_rng(seed).choice(len(prompts), size=max_prompts, replace=False)
    prompts = [prompts[i] for i in np.sort(keep)]
  return prompts


def chexpert_5x200_prompts(
  max_per_class: Optional[int] = None, seed: int = 0, prompt_file: Optional[dict] = None
) -> dict[str, list[str]]:
  """The GLoRIA prompts of each CheXpert 5x200 class.

  Args:
    max_per_class: optional cap (see `combine_prompt_parts`); the sampling
      seed of class i is ``seed + i`` so that classes draw independently.
    seed: base sampling seed.
    prompt_file: parsed prompt-parts file; the bundled one by default.

  Returns:
    {class name: prompts}, in the file's class order.
  """
  data = prompt_file or load_prompt_file(CHEXPERT_5X200_PROMPTS)
  return {
    name: combine_prompt_parts(groups, max_per_class, seed + i)
    for i, (name, groups) in enumerate(data["classes"].items())
  }


def pneumonia_prompts(prompt_set: str = "alta_rsna", prompt_file: Optional[dict] = None) -> dict[str, list[str]]:
  """{"positive": [...], "negative": [...]} pneumonia prompts of one set."""
  data = prompt_file or load_prompt_file(PNEUMONIA_PROMPTS)
  chosen = data[prompt_set]
  return {"positive": list(chosen["positive"]), "negative": list(chosen["negative"])}


# ---------------------------------------------------------------------------
# Zero-shot classification.
# ---------------------------------------------------------------------------


def class_embeddings(
  prompts_by_class: Mapping[str, Sequence[str]], text_embed_fn: TextEmbedFn, class_names: Optional[Sequence[str]] = None
) -> np.ndarray:
  """One unit vector per class: the normalised mean of its prompt embeddings.

  Each prompt embedding is L2-normalised before averaging (a no-op for the
  model's already normalised outputs) so that no prompt outweighs another.
  All prompts go to ``text_embed_fn`` in one call; it may batch internally.

  Args:
    prompts_by_class: {class name: prompts}.
    text_embed_fn: list of strings -> [N, P].
    class_names: row order of the result; the mapping's order by default.

  Returns:
    float [C, P].
  """
  names = list(class_names or prompts_by_class.keys())
  prompts = [list(prompts_by_class[n]) for n in names]
  if any(not p for p in prompts):
    raise ValueError("every class needs at least one prompt")
  flat = [p for group in prompts for p in group]
  emb = l2_normalize(np.asarray(text_embed_fn(flat)))
  if emb.shape[0] != len(flat):
    raise ValueError(f"text_embed_fn returned {emb.shape[0]} rows for {len(flat)} prompts")
  bounds = np.cumsum([0] + [len(p) for p in prompts])
  means = np.stack([emb[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
  return l2_normalize(means)


def zero_shot_predict(image_emb: np.ndarray, class_emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Argmax-cosine class of each image.

  Returns:
    (int [M] predicted class index, float [M, C] cosine similarities).
    Equal cosines resolve to the lower class index.
  """
  cos = l2_normalize(image_emb) @ l2_normalize(class_emb).T
  return np.argmax(cos, axis=1), cos


def chexpert_5x200_zero_shot(
  image_emb: np.ndarray,
  labels: np.ndarray,
  text_embed_fn: TextEmbedFn,
  class_names: Sequence[str] = (CHEXPERT_5X200_CLASSES),
  max_per_class: Optional[int] = None,
  seed: int = 0,
  *,
  num_resamples: int = 1000,
  bootstrap_seed: int = 0,
) -> dict[str, float]:
  """CheXpert 5x200 zero-shot accuracy, its majority baseline and interval.

  Args:
    image_emb: [M, P] image embeddings.
    labels: [M] class index into ``class_names`` (or the class name itself).
    text_embed_fn: list of strings -> [N, P].
    class_names: class order.
    max_per_class: optional prompt cap (see `combine_prompt_parts`).
    seed: prompt sampling seed.
    num_resamples: bootstrap resamples of the interval (0: none).
    bootstrap_seed: bootstrap seed.

  Returns:
    {"ACC": accuracy, "ACC_majority": accuracy of always predicting the most
     frequent class (20 % on the balanced 5x200 set), "ACC_ci_low",
     "ACC_ci_high": 95 % bootstrap interval over images}.
  """
  prompts = chexpert_5x200_prompts(max_per_class, seed)
  class_emb = class_embeddings(prompts, text_embed_fn, class_names)
  pred, _ = zero_shot_predict(image_emb, class_emb)
  y = _class_indices(labels, class_names)
  out = {"ACC": metrics.accuracy(y, pred), "ACC_majority": metrics.majority_accuracy(y)}
  if num_resamples:
    low, high = metrics.bootstrap_ci(y == pred, num_resamples, bootstrap_seed)
    out.update({"ACC_ci_low": float(low), "ACC_ci_high": float(high)})
  return out


def _class_indices(labels: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.dtype.kind in "iu":
    return labels
  lookup = {n: i for i, n in enumerate(class_names)}
  return np.array([lookup[str(name)] for name in labels])


def binary_probability(
  image_emb: np.ndarray, positive_emb: np.ndarray, negative_emb: np.ndarray, logit_scale: float = 1.0
) -> np.ndarray:
  """p = softmax(s * [cos_pos, cos_neg])[0] = sigmoid(s * (cos_pos - cos_neg)).

  The protocol uses the raw cosines (``logit_scale`` = 1), so p stays near 0.5
  and the threshold search does the calibration.  A learned scale (e.g. the
  contrastive temperature, about 1/0.07) can be passed to sharpen p; AUC does
  not change with it, the thresholded ACC/F1 can.
  """
  img = l2_normalize(image_emb)
  diff = img @ l2_normalize(positive_emb) - img @ l2_normalize(negative_emb)
  return 1.0 / (1.0 + np.exp(-logit_scale * diff))


def rsna_zero_shot(
  image_emb: np.ndarray,
  labels: np.ndarray,
  text_embed_fn: TextEmbedFn,
  prompt_set: str = "alta_rsna",
  logit_scale: float = 1.0,
  n_splits: int = 10,
  seed: int = 0,
) -> dict[str, float]:
  """RSNA pneumonia zero-shot: AUC on all images, ACC/F1 by threshold CV.

  A prompt set with several prompts per side uses the normalised mean of its
  prompt embeddings as that side's vector.

  Args:
    image_emb: [M, P] image embeddings.
    labels: [M] 1 pneumonia, 0 not.
    text_embed_fn: list of strings -> [N, P].
    prompt_set: key in the pneumonia prompt file.
    logit_scale: multiplier of the cosines before the softmax.
    n_splits: folds of the threshold search.
    seed: fold seed.

  Returns:
    {"AUC", "ACC", "F1", "ACC_std", "F1_std"} and their image-blind
    baselines on the same folds: "AUC_chance" (0.5), "ACC_majority",
    "F1_all_positive" (see `metrics.threshold_cv_baselines`).
  """
  prompts = pneumonia_prompts(prompt_set)
  pos, neg = class_embeddings(prompts, text_embed_fn, ("positive", "negative"))
  p = binary_probability(image_emb, pos, neg, logit_scale)
  cv = metrics.threshold_cv(labels, p, n_splits, seed)
  return {
    "AUC": metrics.roc_auc(labels, p),
    "AUC_chance": 0.5,
    **{k: cv[k] for k in ("ACC", "F1", "ACC_std", "F1_std")},
    **metrics.threshold_cv_baselines(labels, n_splits, seed),
  }


# ---------------------------------------------------------------------------
# Linear probe (MS-CXR-T temporal classification).
# ---------------------------------------------------------------------------


def fit_logistic_regression(
  x: np.ndarray, y: np.ndarray, num_classes: int, l2: float = 1e-3, max_iter: int = 100, tol: float = 1e-9
) -> dict[str, np.ndarray]:
  """Multinomial logistic regression by damped Newton steps (numpy).

  Objective: mean_i CE(softmax(x_i W + b), y_i) + l2 / 2 * ||W||^2, the bias
  unpenalised; in scikit-learn's terms ``LogisticRegression(C=1 / (l2 * N))``.
  The objective is convex and the solver starts from zero with no randomness,
  so a fit is a pure function of its inputs.  Newton's method needs a handful
  of iterations for the embedding sizes probed here (D ~ 128, K ~ 3), where a
  first-order method would need thousands.

  Args:
    x: [N, D] features.
    y: [N] class ids in [0, num_classes).
    num_classes: K.
    l2: weight penalty (> 0).
    max_iter: Newton iterations at most.
    tol: stop when the largest gradient entry is below this.

  Returns:
    {"w": [D, K], "b": [K]}.
  """
  x = np.asarray(x, dtype=np.float64)
  n, dim = x.shape
  xb = np.concatenate([x, np.ones((n, 1))], axis=1)  # bias as last feature
  onehot = np.eye(num_classes)[np.asarray(y)]
  penalty = np.ones((dim + 1, num_classes))
  penalty[-1] = 0.0
  theta = np.zeros((dim + 1, num_classes))

  def objective(t):
    logits = xb @ t
    logz = _logsumexp(logits)
    return np.mean(logz - np.sum(logits * onehot, axis=1)) + 0.5 * l2 * np.sum(penalty * t * t)

  size = (dim + 1) * num_classes
  for _ in range(max_iter):
    logits = xb @ theta
    p = np.exp(logits - _logsumexp(logits)[:, None])
    grad = xb.T @ (p - onehot) / n + l2 * penalty * theta
    if np.max(np.abs(grad)) < tol:
      break
    hess = np.empty((dim + 1, num_classes, dim + 1, num_classes))
    for k in range(num_classes):
      for j in range(num_classes):
        w = p[:, k] * ((k == j) - p[:, j])
        hess[:, k, :, j] = (xb * w[:, None]).T @ xb / n
    hess = hess.reshape(size, size) + np.diag(l2 * penalty.ravel())
    # The bias is shift-invariant across classes: a tiny ridge keeps the
    # system solvable without moving the minimum.
    step = np.linalg.solve(hess + 1e-10 * np.eye(size), grad.ravel()).reshape(theta.shape)
    f0, rate = objective(theta), 1.0
    slope = float(np.sum(grad * step))
    while objective(theta - rate * step) > f0 - 1e-4 * rate * slope:
      rate *= 0.5
      if rate < 1e-10:
        break
    theta = theta - rate * step
  return {"w": theta[:-1], "b": theta[-1]}


def _logsumexp(logits: np.ndarray) -> np.ndarray:
  top = logits.max(axis=1)
  return top + np.log(np.exp(logits - top[:, None]).sum(axis=1))


def predict_logistic_regression(params: Mapping[str, np.ndarray], x: np.ndarray) -> np.ndarray:
  return np.argmax(np.asarray(x) @ params["w"] + params["b"], axis=1)


def linear_probe_cv(
  features: np.ndarray,
  labels: np.ndarray,
  n_splits: int = 5,
  seed: int = 0,
  l2: float = 1e-3,
  metric: str = "macro_accuracy",
) -> dict[str, Any]:
  """Cross-validated linear probe on frozen embeddings.

  Folds come from `metrics.stratified_folds` (seeded).  In each fold the
  features are standardised with the training part's mean and std, a
  logistic regression is fitted there and scored on the held-out part.

  Args:
    features: [N, D] embeddings (e.g. fused current + prior image features).
    labels: [N] class ids (e.g. improving / stable / worsening).
    n_splits: number of folds.
    seed: fold seed.
    l2: weight penalty (see `fit_logistic_regression`).
    metric: "macro_accuracy" (BioViL-T's MS-CXR-T metric) or "accuracy".

  Returns:
    {"mean": float, "std": float (population std over folds),
     "folds": per-fold scores}.
  """
  score_fn = {"macro_accuracy": metrics.macro_accuracy, "accuracy": metrics.accuracy}[metric]
  x = np.asarray(features, dtype=np.float64)
  classes, y = np.unique(np.asarray(labels), return_inverse=True)
  folds = metrics.stratified_folds(y, n_splits, seed)
  scores = []
  for fold in range(n_splits):
    test = folds == fold
    mean = x[~test].mean(axis=0)
    std = np.maximum(x[~test].std(axis=0), 1e-8)
    params = fit_logistic_regression((x[~test] - mean) / std, y[~test], len(classes), l2)
    pred = predict_logistic_regression(params, (x[test] - mean) / std)
    scores.append(score_fn(y[test], pred))
  return {"mean": float(np.mean(scores)), "std": float(np.std(scores)), "folds": [float(s) for s in scores]}
