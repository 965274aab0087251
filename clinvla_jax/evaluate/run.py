"""Evaluation of a model on the datasets named in ``config.eval``.

  results = run_evaluation(config, variables, workdir)

embeds each configured dataset once (`embed.embed_dataset`), runs the
evaluators on the embeddings and writes to ``workdir``:

  results.json               every score under "<dataset>/<task>/<metric>"
                             (fractions in [0, 1], e.g.
                             "covid_cxr/image_to_text/P@5"), each with its
                             chance level and, where it is a mean over
                             queries, a 95 % bootstrap interval (below)
  results.md                 the paper's tables with our row beside the
                             published ones, then our other datasets as
                             "score [interval] · chance" cells
  retrieval_examples.png     text query -> top-5 images, image query ->
                             top-5 reports, on the first generic dataset,
                             with the numbers that tell a trained model
                             from an untrained one (rank of the own report,
                             paired vs. unpaired cosine, score spread)

Datasets (see ``configs/base.py``, block ``eval``):

* ``eval.datasets``: name -> {path, split}.  Each is a converted folder with
  named labels; it gets the generic retrieval evaluator (image<->text and
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
* ``eval.chexpert_5x200``, ``eval.chexpert_8x200`` (+ ``_queries``,
  ``_lists``), ``eval.rsna``, ``eval.ms_cxr_t`` (+ ``_labels``): the
  published protocols of protocols.md section 5, when their paths are set.

``write_embeddings`` serves ``--mode=embed``: the global embeddings of one
dataset in an .npz, so any metric can be recomputed without the model.
"""

from __future__ import annotations

import csv
import json
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional

from absl import logging
import numpy as np

from clinvla_jax import api
from clinvla_jax.evaluate import EVALUATORS
from clinvla_jax.evaluate import EmbeddingSet
from clinvla_jax.evaluate import embed as embed_lib
from clinvla_jax.evaluate import metrics
from clinvla_jax.evaluate import report
from clinvla_jax.evaluate import retrieval
from clinvla_jax.evaluate import run_evaluators
from clinvla_jax.evaluate import zeroshot

TextEmbedFn = Callable[[Sequence[str]], np.ndarray]

LABEL_PROMPTS = pathlib.Path(__file__).resolve().parent.parent / "assets" / "prompts" / "label_prompts.json"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
FIGURE_PNG = "retrieval_examples.png"
FIGURE_TOP_K = 5
PAPER_TABLES = ("table3", "table4", "table5")
CHEXPERT_5X200_CLASSES = zeroshot.CHEXPERT_5X200_CLASSES


# ---------------------------------------------------------------------------
# Label zero-shot for generic datasets.
# ---------------------------------------------------------------------------


def load_label_prompts(path: Optional[str | os.PathLike[str]] = None) -> dict:
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

  Returns:
    {"zero_shot/ACC": top-1 hit rate over studies with a positive label,
     "zero_shot/ACC_majority": the same hit rate for always predicting the
     label most often positive among those studies,
     "zero_shot/ACC_ci_low", "zero_shot/ACC_ci_high": 95 % bootstrap interval
     over those studies (``num_resamples`` 0: none),
     "zero_shot/AUC": mean one-vs-rest AUC over labels with both positive
     and negative studies, "zero_shot/AUC_chance": 0.5}; a metric without
    any eligible study is left out.
  """
  pos = positive_labels(labels)
  if pos.shape[1] != len(label_names):
    raise ValueError(f"{pos.shape[1]} label columns for {len(label_names)} names")
  prompts = label_prompts(label_names, prompt_file)
  class_emb = zeroshot.class_embeddings(prompts, text_embed_fn, label_names)
  pred, cos = zeroshot.zero_shot_predict(image_emb, class_emb)
  results = {}
  labelled = pos.any(axis=1)
  if labelled.any():
    hit = pos[np.arange(len(pred)), pred]
    results.update(
      {f"zero_shot/{k}": v for k, v in metrics.summarize("ACC", hit[labelled], None, num_resamples, seed).items()}
    )
    results["zero_shot/ACC_majority"] = float(metrics.majority_label_hits(pos[labelled]).mean())
  aucs = [metrics.roc_auc(pos[:, c], cos[:, c]) for c in range(pos.shape[1]) if 0 < pos[:, c].sum() < len(pos)]
  if aucs:
    results["zero_shot/AUC"] = float(np.mean(aucs))
    results["zero_shot/AUC_chance"] = 0.5
  return results


# ---------------------------------------------------------------------------
# Dataset specs.
# ---------------------------------------------------------------------------


def usable_ks(ks: Sequence[int], num_items: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(kept, skipped) cut-offs: K must be below the set size.

  Image->image search leaves the query out, so N - 1 items are rankable.
  """
  kept = tuple(int(k) for k in ks if 1 <= k <= num_items - 1)
  skipped = tuple(int(k) for k in ks if k not in kept)
  return kept, skipped


def generic_datasets(config) -> dict[str, tuple[str, Optional[str]]]:
  """{name: (path, split or None)} from ``config.eval.datasets``.

  An entry is a path, or a mapping with ``path`` and optional ``split``
  (default ``config.eval.split``; "" reads every shard).
  """
  default_split = config.eval.get("split", "") or None
  out = {}
  for name, spec in config.eval.get("datasets", {}).items():
    if name in EVALUATORS:
      raise ValueError(f"eval.datasets.{name}: the name is reserved for the {name} protocol; set eval.{name} instead")
    if isinstance(spec, (str, os.PathLike)):
      path, split = os.fspath(spec), default_split
    else:
      path = spec["path"]
      split = spec.get("split", default_split) or None
    out[name] = (path, split)
  return out


def _texts_or_none(emb: embed_lib.DatasetEmbeddings) -> Optional[np.ndarray]:
  # Sets without report text (CheXpert, RSNA) still come with an embedding
  # of the empty string; it must not enter text retrieval.
  if emb.text is None or not any(t.strip() for t in emb.texts):
    return None
  return emb.text


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


# ---------------------------------------------------------------------------
# Running the evaluators.
# ---------------------------------------------------------------------------


def evaluator_config(config) -> dict[str, Any]:
  """`run_evaluators` overrides from ``config.eval``."""
  ev = config.eval
  out = {"retrieval_ks": tuple(ev.get("retrieval_ks", (5, 10, 50)))}
  for key in ("recall_ks", "bootstrap_resamples", "bootstrap_seed"):
    if ev.get(key) is not None:
      value = ev.get(key)
      out[key] = tuple(value) if key == "recall_ks" else int(value)
  if ev.get("chexpert_8x200_lists"):
    out["chexpert_8x200_dir"] = ev.chexpert_8x200_lists
  if ev.get("zero_shot_max_prompts"):
    out["zero_shot_max_prompts"] = int(ev.zero_shot_max_prompts)
  return out


def _evaluate_generic(
  name: str,
  emb: embed_lib.DatasetEmbeddings,
  text_fn: TextEmbedFn,
  ev_cfg: Mapping[str, Any],
  prompt_file: Mapping[str, Any],
  notes: list[str],
) -> dict[str, float]:
  ks, skipped = usable_ks(ev_cfg["retrieval_ks"], len(emb))
  if skipped:
    note = f"{name}: P@{', P@'.join(map(str, skipped))} skipped: {len(emb)} studies leave fewer than K rankable items."
    logging.warning(note)
    notes.append(note)
  results = {}
  generic = EmbeddingSet(image=emb.image, text=_texts_or_none(emb), labels=emb.labels, ids=emb.ids, texts=emb.texts)
  if ks:
    results.update(run_evaluators([name], {name: generic}, text_fn, {**ev_cfg, "retrieval_ks": ks}))
  if emb.label_names:
    results.update(
      report.flatten_results(
        {
          name: label_zero_shot(
            emb.image,
            emb.labels,
            emb.label_names,
            text_fn,
            prompt_file,
            num_resamples=int(ev_cfg.get("bootstrap_resamples", retrieval.BOOTSTRAP_RESAMPLES)),
            seed=int(ev_cfg.get("bootstrap_seed", retrieval.BOOTSTRAP_SEED)),
          )
        }
      )
    )
  else:
    notes.append(f"{name}: no label names in the manifest, no zero-shot.")
  return results


def _protocol_inputs(config, predict, placed) -> dict[str, Any]:
  """Embeddings of the published protocol sets whose paths are set."""
  ev = config.eval
  inputs = {}

  def embed(path, split, **kw):
    return embed_lib.embed_dataset(config, None, path, split=split or None, predict_fn=predict, placed=placed, **kw)

  if ev.get("chexpert_5x200"):
    emb = embed(ev.chexpert_5x200, ev.get("chexpert_5x200_split"))
    inputs["chexpert_5x200"] = EmbeddingSet(
      image=emb.image,
      text=_texts_or_none(emb),
      ids=emb.ids,
      labels=class_names_of(emb.labels, emb.label_names, CHEXPERT_5X200_CLASSES),
    )
  if ev.get("chexpert_8x200"):
    if not ev.get("chexpert_8x200_lists"):
      raise ValueError("eval.chexpert_8x200 needs eval.chexpert_8x200_lists")
    sets = {"candidates": embed(ev.chexpert_8x200, None, with_text=False)}
    if ev.get("chexpert_8x200_queries"):
      sets["image_queries"] = embed(ev.chexpert_8x200_queries, None, with_text=False)
    inputs["chexpert_8x200"] = sets
  if ev.get("rsna"):
    emb = embed(ev.rsna, ev.get("rsna_split"), with_text=False)
    col = list(emb.label_names).index("Pneumonia") if "Pneumonia" in emb.label_names else 0
    inputs["rsna"] = EmbeddingSet(
      image=emb.image, ids=emb.ids, labels=positive_labels(emb.labels)[:, col].astype(np.int64)
    )
  if ev.get("ms_cxr_t"):
    if not ev.get("ms_cxr_t_labels"):
      raise ValueError("eval.ms_cxr_t needs eval.ms_cxr_t_labels")
    # Temporal classification needs the prior views whatever eval.views says.
    emb = embed(ev.ms_cxr_t, ev.get("ms_cxr_t_split"), with_text=False, view_slots=api.model_config(config).view_slots)
    row = {sid: i for i, sid in enumerate(emb.ids)}
    sets = {}
    for finding, by_study in read_temporal_labels(ev.ms_cxr_t_labels).items():
      found = [(row[s], lab) for s, lab in by_study.items() if s in row]
      if found:
        idx, labs = zip(*sorted(found))
        sets[finding] = EmbeddingSet(image=emb.image[list(idx)], labels=np.asarray(labs))
    inputs["ms_cxr_t"] = sets
  return inputs


def run_evaluation(
  config, variables, workdir: str | os.PathLike[str], *, tokenizer=None, mesh=None, predict_fn=None
) -> dict[str, float]:
  """Embeds and evaluates every dataset of ``config.eval``; writes outputs.

  Args:
    config: full config with ``model`` and ``eval``.
    variables: {"params": ...}.
    workdir: output folder (created).
    tokenizer: for prompts and text queries; default from ``config.init``
      (`embed.tokenizer_from_config`).
    mesh: the mesh to evaluate on; default the training mesh of
      ``config.mesh``.
    predict_fn: the `clinvla_jax.predict.PredictFn` to embed with (training
      passes ``TrainSetup.predict_fn``); default one built from ``config``
      and ``mesh``.

  Returns:
    The flat results written to results.json.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  ev_cfg = evaluator_config(config)
  prompt_file = load_label_prompts(config.eval.get("label_prompts") or None)
  predict = embed_lib.resolve_predict_fn(config, mesh, predict_fn)
  # Placed once: every dataset and the prompts read the same sharded variables.
  placed = predict.place(variables)
  text_fn = embed_lib.make_text_embed_fn(config, None, tokenizer, predict_fn=predict, placed=placed)
  results, notes, generic = {}, [], {}
  for name, (path, split) in generic_datasets(config).items():
    emb = embed_lib.embed_dataset(config, None, path, split=split, predict_fn=predict, placed=placed)
    generic[name] = emb
    notes.append(f"{name}: {len(emb)} studies ({split or 'all shards'}), views: {config.eval.get('views', 'frontal')}.")
    results.update(_evaluate_generic(name, emb, text_fn, ev_cfg, prompt_file, notes))
  protocols = _protocol_inputs(config, predict, placed)
  if protocols:
    results.update(run_evaluators(list(protocols), protocols, text_fn, ev_cfg))
  if not results:
    raise ValueError("config.eval names no dataset to evaluate")

  written = report.write_results_json(results, workdir / RESULTS_JSON)
  text = report.markdown_report(written, tables=PAPER_TABLES) + other_results_markdown(written, notes)
  (workdir / RESULTS_MD).write_text(text, encoding="utf-8")
  if config.eval.get("figure", True):
    shown = next((e for e in generic.values() if _texts_or_none(e) is not None and e.label_names), None)
    if shown is not None:
      retrieval_examples_figure(shown, text_fn, workdir / FIGURE_PNG, prompt_file)
  logging.info("Wrote %d results to %s", len(written), workdir)
  return written


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
  pos = positive_labels(emb.labels)
  label = int(np.argmax(pos.sum(axis=0)))
  name = emb.label_names[label]
  query = label_prompts([name], prompt_file)[name][0]
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
