"""Evaluation on precomputed embeddings.

The model is run once elsewhere (``evaluate/embed.py``) to produce global
image / report embeddings; everything in this package works on those arrays
and on a ``text_embed_fn(list[str]) -> np.ndarray [N, P]`` for prompts and
text queries.  The entry point is `run_evaluators`:

  results = run_evaluators(
      ["chexpert_8x200", "chexpert_5x200", "rsna", "covid_cxr"],
      embeddings, text_embed_fn, config)
  report.write_results_json(results, workdir / "results.json")
  report.write_markdown(results, workdir / "results.md")

``embeddings`` maps each evaluator name to what it needs:

  "chexpert_8x200": {"candidates": EmbeddingSet(image=[1600, P], ids=paths),
                     "image_queries": EmbeddingSet(image=[80, P], ids=paths)}
      rows are matched to the published lists by ``ids`` (CSV "Path"); without
      ids they must already be in list order.  Text queries come from the lists
      through ``text_embed_fn``.
  "chexpert_5x200": EmbeddingSet(image, text, labels=[N] class names or ids)
      image->text P@5/10/100 (if text) and 5-class zero-shot accuracy.
  "rsna": EmbeddingSet(image, labels=[N] 0/1)   zero-shot AUC, ACC, F1.
  "ms_cxr_t": {finding: EmbeddingSet(image=features, labels=[N] classes)}
      cross-validated linear probe, macro accuracy mean and std per finding.
  any other name: EmbeddingSet(image and/or text, labels [N] or [N, C])
      generic retrieval in all available directions; R@K where paired.

Results are a flat dict "<name>/<task>/<metric>" -> fraction in [0, 1].
Beside each score sit keys that tell whether it beats a model that learned
nothing, and by how much it could move on another draw of the queries:

  .../P@K_chance, .../R@K_chance   score of a uniformly random ranking
  .../P@K_majority                 score of one ranking for every query, the
                                   label prior's (items of the commonest
                                   findings first): the best that ignores the
                                   query
  .../P@K_ci_low, .../P@K_ci_high  95 % bootstrap interval over queries
  (same for R@K and for zero-shot ACC and BACC)
  .../zero_shot/ACC_majority       always predicting the majority class
  .../zero_shot/BACC_chance, .../zero_shot/BACC_majority
                                   balanced accuracy (the mean hit rate over
                                   labels) of a random label and of the majority
  rsna/zero_shot/F1_all_positive   always predicting pneumonia
  .../zero_shot/AUC_chance         0.5

e.g. "chexpert_8x200/image_to_image/P@5_chance",
"chexpert_5x200/zero_shot/ACC_majority".
"""

from typing import Any

from clinvla_jax.evaluate import metrics
from clinvla_jax.evaluate import options
from clinvla_jax.evaluate import retrieval
from clinvla_jax.evaluate import zeroshot
from clinvla_jax.evaluate.scoring import DEFAULT_CONFIG, EVALUATORS, EmbeddingSet, TextEmbedFn, run_evaluators

# The model-running entry points load JAX and Grain, so they are imported on
# first use: code that only scores saved embeddings stays numpy-only.
_LAZY_EXPORTS = {
  "embed_dataset": "embed",
  "make_text_embed_fn": "embed",
  "run_evaluation": "run",
  "write_embeddings": "run",
}


def __getattr__(name: str) -> Any:
  if name in _LAZY_EXPORTS:
    import importlib  # pylint: disable=g-import-not-at-top

    module = importlib.import_module(f"{__name__}.{_LAZY_EXPORTS[name]}")
    return getattr(module, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
  "DEFAULT_CONFIG",
  "EVALUATORS",
  "EmbeddingSet",
  "TextEmbedFn",
  "embed_dataset",
  "make_text_embed_fn",
  "metrics",
  "options",
  "retrieval",
  "run_evaluation",
  "run_evaluators",
  "write_embeddings",
  "zeroshot",
]
