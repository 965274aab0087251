"""Evaluation of a model with the evaluators named in ``config.evals``.

  results = run_evaluation(config, variables, workdir)

builds the evaluators (`evaluators.build_evaluators`), lets each embed its
set once through the run's `clinvla_jax.predict.PredictFn`, scores the
embeddings and writes to ``workdir``:

  results.json               every score under "<dataset>/<task>/<metric>"
                             (fractions in [0, 1], e.g.
                             "covid_cxr/image_to_text/P@5"), each with its
                             chance level and, where it is a mean over
                             queries, a 95 % bootstrap interval (below)
  results.md                 the paper's tables with our row beside the
                             published ones, then our other datasets as
                             "score [interval] · chance" cells
  retrieval_examples.png     text query -> top-5 images, image query ->
                             top-5 reports, on the first retrieval set,
                             with the numbers that tell a trained model
                             from an untrained one (rank of the own report,
                             paired vs. unpaired cosine, score spread)

Evaluators (``config.evals.<name>``, options in `clinvla_jax.evaluate.options`):

* type "retrieval": a converted folder with named labels; it gets the
  generic retrieval evaluator (image<->text and
  image->image P@K, relevance = a shared positive label) and a label
  zero-shot evaluator: one class vector per label from the prompt file
  (``assets/prompts/label_prompts.json``), top-1 accuracy ("ACC": the
  predicted label is one of the study's positive labels, over studies with
  any) and the mean one-vs-rest AUC over labels with both positive and
  negative studies ("AUC").  K not smaller than the set is skipped and noted.
  Paired image<->report directions also get instance-level recall "R@K"
  (K = 1, 5, 10 below the set size): the query's own report / image is in
  its top K.

Keys added beside each score (same "<dataset>/<task>/" prefix):

  P@K_chance, R@K_chance       a uniformly random ranking: mean over queries
                               of relevant / rankable items; K / N for R@K
  P@K_ci_low, P@K_ci_high      95 % percentile bootstrap over queries (1000
  R@K_ci_low, R@K_ci_high      resamples, seed 0), e.g.
  ACC_ci_low, ACC_ci_high      "covid_cxr/text_to_image/R@5_ci_high"
  zero_shot/ACC_majority       always predicting the label most often
                               positive (5x200, RSNA: the majority class)
  zero_shot/AUC_chance         0.5
  rsna/zero_shot/F1_all_positive  always predicting pneumonia
* types "chexpert_5x200", "chexpert_8x200" (+ ``queries``, ``lists``),
  "rsna", "ms_cxr_t" (+ ``labels``): the published protocols of
  protocols.md section 5, named after their type so that the paper tables
  of results.md find them.

Which images were scored (results.json and results.md, not scores):

  <name>/selection             chexpert_5x200, rsna: "published_list" when
                               the evaluator was given ``list=PATH``, else
                               how the converter chose the images
                               ("seeded_rule", "published_list", "unknown")
  <name>/list_sha256           with ``list``: sha256 of the list file
  <name>/list_size             images in the list
  <name>/list_missing          of those, not in the converted split
                               (non-zero only with ``allow_missing=True``)

Only numbers on the published lists compare with the papers'.

Results are keyed by the evaluator's name: ``config.evals.covid_cxr`` writes
"covid_cxr/...".  Each evaluator has its own training cadence
(``every_steps``); ``--mode=eval`` runs all of them.

``write_embeddings`` serves ``--mode=embed``: the global embeddings of one
dataset in an .npz, so any metric can be recomputed without the model.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from absl import logging
import numpy as np

from clinvla_jax.evaluate import embed as embed_lib
from clinvla_jax.evaluate import evaluators as evaluators_lib
from clinvla_jax.evaluate import labels as labels_lib
from clinvla_jax.evaluate import report
from clinvla_jax.evaluate import retrieval

TextEmbedFn = Callable[[Sequence[str]], np.ndarray]

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
FIGURE_PNG = "retrieval_examples.png"
FIGURE_TOP_K = 5
PAPER_TABLES = ("table3", "table4", "table5")


def run_evaluation(
  config,
  variables,
  workdir: str | os.PathLike[str],
  *,
  tokenizer=None,
  mesh=None,
  predict_fn=None,
  names: Optional[Sequence[str]] = None,
) -> dict[str, float]:
  """Embeds and scores with the evaluators of ``config.evals``; writes outputs.

  Args:
    config: full config with ``model``, ``eval`` (how studies are embedded)
      and ``evals`` (the evaluators by name).
    variables: {"params": ...}.
    workdir: output folder (created).
    tokenizer: for prompts and text queries; default from ``config.init``
      (`embed.tokenizer_from_config`).
    mesh: the mesh to evaluate on; default the training mesh of
      ``config.mesh``.
    predict_fn: the `clinvla_jax.predict.PredictFn` to embed with (training
      passes ``TrainSetup.predict_fn``); default one built from ``config``
      and ``mesh``.
    names: the evaluators to run (training passes those due at a step);
      default every one with a path.

  Returns:
    The scores written to results.json (numbers, what training logs);
    results.json also holds each evaluator's set description
    ("<name>/selection", "<name>/list_sha256", ...), which is not a score.
  """
  evaluators = evaluators_lib.build_evaluators(config, names)
  if not evaluators:
    raise ValueError("config.evals names no evaluator with a path (see configs/base.py, block evals)")
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  predict = embed_lib.resolve_predict_fn(config, mesh, predict_fn)
  # Placed once: every evaluator and the prompts read the same sharded variables.
  placed = predict.place(variables)
  text_fn = embed_lib.make_text_embed_fn(config, None, tokenizer, predict_fn=predict, placed=placed)
  context = evaluators_lib.EvalContext(config, predict, placed, text_fn)
  results, set_info, notes, figure_source = {}, {}, [], None
  for evaluator in evaluators.values():
    out = evaluator.run(context)
    results.update(out.scores)
    set_info.update(out.set_info)
    notes.extend(out.notes)
    if figure_source is None and out.figure_set is not None:
      figure_source = (out.figure_set, evaluator.options)
  if not results:
    raise ValueError(f"the evaluators {sorted(evaluators)} produced no score")

  written = report.write_results_json(results, workdir / RESULTS_JSON, set_info=set_info)
  scores = {k: written[k] for k in results}
  text = report.markdown_report(scores, tables=PAPER_TABLES) + other_results_markdown(scores, notes)
  text += report.set_info_markdown({k: written[k] for k in set_info})
  (workdir / RESULTS_MD).write_text(text, encoding="utf-8")
  for key, value in set_info.items():
    logging.info("%s: %s", key, value)
  if figure_source is not None:
    shown, opts = figure_source
    retrieval_examples_figure(
      shown, text_fn, workdir / FIGURE_PNG, labels_lib.load_label_prompts(opts.label_prompts or None)
    )
  logging.info("Wrote %d results to %s", len(written), workdir)
  return scores


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------


OTHER_RESULTS_LEGEND = (
  "Cells: score [95 % bootstrap interval over queries or studies] "
  "\u00b7 chance: a uniformly random ranking (P@K: mean share of relevant "
  "items in the gallery; R@K: K / N), 50.0 for AUC; majority: always the "
  "most frequent label; all-positive: always positive.  A score whose "
  "interval contains its chance level is no evidence that the model "
  "learned."
)


def other_results_markdown(results: Mapping[str, float], notes: Sequence[str] = ()) -> str:
  """Tables of the datasets the paper does not report (task x metric, %).

  One column per base metric (P@5, R@1, ACC, ...); its companion keys
  (chance, interval, std) go into the same cell, see `report.score_cell`.
  Companions of a score that a paper table shows stay with that table.
  """
  tables = report.load_paper_results()["tables"]
  shown = {c for name in PAPER_TABLES for c in tables[name]["columns"]}
  by_dataset: dict[str, dict[str, dict[str, float]]] = {}
  for key, value in results.items():
    dataset, *task, metric = key.split("/")
    base, _ = report.split_metric(metric)
    if "/".join([dataset, *task, base]) in shown:
      continue
    by_dataset.setdefault(dataset, {}).setdefault("/".join(task), {})[metric] = value
  lines = []
  for dataset, tasks in by_dataset.items():
    bases = sorted({report.split_metric(m)[0] for t in tasks.values() for m in t}, key=_metric_order)
    lines += [
      "",
      f"**{dataset}** (this implementation; no published numbers)",
      "",
      "| Task | " + " | ".join(bases) + " |",
      "| --- |" + " --- |" * len(bases),
    ]
    for task, scores in tasks.items():
      cells = [report.score_cell(scores, b) for b in bases]
      lines.append(f"| {task} | " + " | ".join(cells) + " |")
  if lines:
    lines += ["", OTHER_RESULTS_LEGEND]
  if notes:
    lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
  return "\n".join(lines) + "\n" if lines else ""


def _metric_order(name: str) -> tuple[int, int, str]:
  # P@5 before P@10 before P@50, then R@K likewise, then the rest by name.
  for group, prefix in enumerate(("P@", "R@")):
    if name.startswith(prefix) and name[2:].isdigit():
      return group, int(name[2:]), name
  return 2, 0, name


class _LazyImages:
  """Sequence view of a dataset's frontal images, decoded when indexed."""

  def __init__(self, emb: embed_lib.DatasetEmbeddings):
    self._emb = emb

  def __getitem__(self, row: int) -> np.ndarray:
    return self._emb.frontal_image(row)

  def __len__(self) -> int:
    return len(self._emb)


def retrieval_examples_figure(
  emb: embed_lib.DatasetEmbeddings,
  text_fn: TextEmbedFn,
  path: str | os.PathLike[str],
  prompt_file: Optional[Mapping[str, Any]] = None,
  k: int = FIGURE_TOP_K,
) -> pathlib.Path:
  """Text query -> top-k images; image query -> top-k reports.

  The text query is the first prompt of the dataset's most frequent label;
  the image query is the first study with that label.  Frames mark hits that
  share the query's label (green) or not (red).  A caption says whether the
  scores carry information (see `report.retrieval_captions`): the rank of
  the query image's own report, the mean cosine of paired vs. unpaired
  image-report pairs, and the spread of the text query's scores.
  """
  pos = labels_lib.positive_labels(emb.labels)
  label = int(np.argmax(pos.sum(axis=0)))
  name = emb.label_names[label]
  query = labels_lib.label_prompts([name], prompt_file)[name][0]
  k = min(k, len(emb))
  text_scores = retrieval.cosine_similarity(text_fn([query]), emb.image)[0]
  image_hits = report.top_hits(text_scores, _LazyImages(emb), k, relevant=pos[:, label])
  row = int(np.flatnonzero(pos[:, label])[0]) if pos[:, label].any() else 0
  scores = retrieval.cosine_similarity(emb.image[row : row + 1], emb.text)[0]
  shares = (pos & pos[row]).any(axis=1)
  report_hits = report.top_hits(scores, list(emb.texts), k, relevant=shares)
  t2i_caption, i2t_caption = report.retrieval_captions(
    text_scores, scores, row, retrieval.paired_cosine_summary(emb.image, emb.text)
  )
  return report.retrieval_figure(
    path,
    text_query=query,
    image_hits=image_hits,
    image_query=emb.frontal_image(row),
    report_hits=report_hits,
    t2i_caption=t2i_caption,
    i2t_caption=i2t_caption,
  )


def write_embeddings(
  config, variables, data, output_npz: str | os.PathLike, split: Optional[str] = None, *, mesh=None
) -> dict[str, np.ndarray]:
  """Writes one dataset's global embeddings for offline metrics.

  The .npz holds image_global [N, P], text_global [N, P], study_id [N],
  labels [N, C] (1 positive, 0 negative, -1 uncertain, NaN not mentioned),
  label_names [C], report_text [N] and record_index [N]; strings are stored
  as unicode arrays, so ``np.load`` needs no pickle.

  Returns:
    The arrays written.
  """
  emb = embed_lib.embed_dataset(config, variables, data, split=split, mesh=mesh)
  arrays = {
    "image_global": np.asarray(emb.image, np.float32),
    "text_global": np.asarray(emb.text, np.float32),
    "study_id": np.asarray(emb.ids, dtype=str),
    "labels": np.asarray(emb.labels, np.float32),
    "label_names": np.asarray(emb.label_names, dtype=str),
    "report_text": np.asarray(emb.texts, dtype=str),
    "record_index": np.asarray(emb.record_index, np.int64),
  }
  output_npz = pathlib.Path(output_npz)
  output_npz.parent.mkdir(parents=True, exist_ok=True)
  with open(output_npz, "wb") as f:
    np.savez(f, **arrays)
  return arrays
