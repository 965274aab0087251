"""The numpy-level scorers of every evaluator type, and `run_evaluators` over saved embeddings.

`EVALUATORS` is the one registry: evaluator type -> scorer(inputs, text_embed_fn, config) -> {"<task>/<metric>": v}.
`clinvla_jax.evaluate.evaluators` builds configured evaluators of these types; each scores through its entry
here.  The inputs per type, the keys and the chance levels beside them are described in `clinvla_jax.evaluate`.
"""

from collections.abc import Callable, Mapping, Sequence
import dataclasses
from typing import Any, Optional

import numpy as np

from clinvla_jax.evaluate import options
from clinvla_jax.evaluate import retrieval
from clinvla_jax.evaluate import zeroshot

TextEmbedFn = Callable[[list[str]], np.ndarray]
Scorer = Callable[[Any, Optional[TextEmbedFn], Optional[Mapping[str, Any]]], dict[str, float]]

# Defaults of the flat overrides `run_evaluators` reads: the scoring options of
# every evaluator type (evaluate/options.py, their one place), plus the folder
# of the 8x200 lists under its numpy-level name.
DEFAULT_CONFIG = {**options.scoring_defaults(), "chexpert_8x200_dir": None}


@dataclasses.dataclass(frozen=True)
class EmbeddingSet:
  """Global embeddings of one evaluation set; rows are studies.

  Attributes:
    image: float [N, P] image embeddings, or None.
    text: float [N, P] report embeddings (row i pairs with image row i), or
      None.
    labels: [N] class ids / names, or [N, C] multi-hot (values > 0 positive).
    ids: optional [N] identifiers (e.g. image paths) for aligning rows.
    texts: optional [N] report texts (for figures).
  """

  image: Optional[np.ndarray] = None
  text: Optional[np.ndarray] = None
  labels: Optional[np.ndarray] = None
  ids: Optional[Sequence[str]] = None
  texts: Optional[Sequence[str]] = None


def _cfg(config: Optional[Mapping[str, Any]], key: str) -> Any:
  if config is not None and key in config:
    return config[key]
  return DEFAULT_CONFIG[key]


def _prefixed(prefix: str, results: Mapping[str, float]) -> dict[str, float]:
  return {f"{prefix}/{k}": v for k, v in results.items()}


def _bootstrap(config: Optional[Mapping[str, Any]]) -> dict[str, int]:
  return {"num_resamples": int(_cfg(config, "bootstrap_resamples")), "seed": int(_cfg(config, "bootstrap_seed"))}


def _rows_in_order(emb: EmbeddingSet, wanted: Sequence[str]) -> np.ndarray:
  if emb.ids is None:
    if np.shape(emb.image)[0] != len(wanted):
      raise ValueError(f"{np.shape(emb.image)[0]} rows without ids for {len(wanted)} listed images")
    return np.asarray(emb.image)
  return retrieval.align_rows(list(emb.ids), emb.image, wanted)


def eval_chexpert_8x200(
  emb: Mapping[str, EmbeddingSet], text_embed_fn: Optional[TextEmbedFn], config: Optional[Mapping[str, Any]]
) -> dict[str, float]:
  list_dir = _cfg(config, "chexpert_8x200_dir")
  if list_dir is None:
    raise ValueError("config['chexpert_8x200_dir'] must name the 8x200 lists")
  lists = retrieval.load_chexpert_8x200(list_dir)
  candidates = _rows_in_order(emb["candidates"], lists.candidate_paths)
  queries = None
  if "image_queries" in emb:
    queries = _rows_in_order(emb["image_queries"], lists.image_query_paths)
  return retrieval.chexpert_8x200(
    candidates, queries, text_embed_fn, lists, _cfg(config, "chexpert_8x200_ks"), **_bootstrap(config)
  )


def eval_chexpert_5x200(
  emb: EmbeddingSet, text_embed_fn: Optional[TextEmbedFn], config: Optional[Mapping[str, Any]]
) -> dict[str, float]:
  results = {}
  if emb.text is not None:
    results.update(
      retrieval.chexpert_5x200_image_to_text(
        emb.image, emb.text, emb.labels, _cfg(config, "chexpert_5x200_ks"), **_bootstrap(config)
      )
    )
  if text_embed_fn is not None:
    boot = _bootstrap(config)
    results.update(
      _prefixed(
        "zero_shot",
        zeroshot.chexpert_5x200_zero_shot(
          emb.image,
          emb.labels,
          text_embed_fn,
          max_per_class=_cfg(config, "zero_shot_max_prompts") or None,  # 0: every combination
          seed=_cfg(config, "zero_shot_seed"),
          num_resamples=boot["num_resamples"],
          bootstrap_seed=boot["seed"],
        ),
      )
    )
  return results


def eval_rsna(
  emb: EmbeddingSet, text_embed_fn: Optional[TextEmbedFn], config: Optional[Mapping[str, Any]]
) -> dict[str, float]:
  if text_embed_fn is None:
    raise ValueError("RSNA zero-shot needs text_embed_fn")
  return _prefixed(
    "zero_shot",
    zeroshot.rsna_zero_shot(
      emb.image,
      emb.labels,
      text_embed_fn,
      prompt_set=_cfg(config, "rsna_prompt_set"),
      logit_scale=_cfg(config, "rsna_logit_scale"),
      n_splits=_cfg(config, "rsna_folds"),
      seed=_cfg(config, "rsna_seed"),
    ),
  )


def eval_ms_cxr_t(
  emb: Mapping[str, EmbeddingSet], text_embed_fn: Optional[TextEmbedFn], config: Optional[Mapping[str, Any]]
) -> dict[str, float]:
  del text_embed_fn  # A linear probe needs no text.
  results = {}
  for finding, subset in emb.items():
    probe = zeroshot.linear_probe_cv(
      subset.image,
      subset.labels,
      n_splits=_cfg(config, "linear_probe_folds"),
      seed=_cfg(config, "linear_probe_seed"),
      l2=_cfg(config, "linear_probe_l2"),
    )
    results[f"linear_probe/{finding}/ACC"] = probe["mean"]
    results[f"linear_probe/{finding}/ACC_std"] = probe["std"]
  return results


def eval_generic_retrieval(
  emb: EmbeddingSet, text_embed_fn: Optional[TextEmbedFn], config: Optional[Mapping[str, Any]]
) -> dict[str, float]:
  del text_embed_fn  # Reports are already embedded.
  return retrieval.evaluate_retrieval(
    emb.labels,
    emb.image,
    emb.text,
    _cfg(config, "retrieval_ks"),
    recall_ks=_cfg(config, "recall_ks"),
    **_bootstrap(config),
  )


EVALUATORS: dict[str, Scorer] = {
  "retrieval": eval_generic_retrieval,
  "chexpert_8x200": eval_chexpert_8x200,
  "chexpert_5x200": eval_chexpert_5x200,
  "rsna": eval_rsna,
  "ms_cxr_t": eval_ms_cxr_t,
}
assert set(EVALUATORS) == set(options.OPTIONS_BY_TYPE)


def run_evaluators(
  names: Sequence[str],
  embeddings: Mapping[str, Any],
  text_embed_fn: Optional[TextEmbedFn] = None,
  config: Optional[Mapping[str, Any]] = None,
) -> dict[str, float]:
  """Runs the named evaluators; see the module docstring for the inputs.

  Args:
    names: evaluator names; a name that is not a type of `EVALUATORS` runs the
      generic retrieval scorer on ``embeddings[name]``.
    embeddings: per-name inputs.
    text_embed_fn: list of strings -> [N, P] text embeddings (prompts, text
      queries); evaluators that need it fail without it.
    config: overrides of `DEFAULT_CONFIG` (a dict or ConfigDict).

  Returns:
    Flat {"<name>/<task>/<metric>": fraction}.
  """
  results = {}
  for name in names:
    evaluator = EVALUATORS.get(name, eval_generic_retrieval)
    results.update(_prefixed(name, evaluator(embeddings[name], text_embed_fn, config)))
  return results
