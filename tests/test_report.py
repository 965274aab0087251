"""Tests of clinvla_jax.evaluate.report and the run_evaluators entry point."""

import json

import matplotlib.image
import numpy as np
import pytest

from clinvla_jax import evaluate
from clinvla_jax.evaluate import report
from clinvla_jax.evaluate import retrieval
from clinvla_jax.evaluate import zeroshot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def normalized(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --------------------------------------------------------------------------
# results.json
# --------------------------------------------------------------------------


def test_results_json_is_flat_sorted_and_round_trips(tmp_path):
  results = {
    "rsna/zero_shot/AUC": 0.9,
    "chexpert_8x200": {"image_to_image/P@5": 0.5, "text_to_image": {"P@10": np.float32(0.25)}},
  }
  path = tmp_path / "out" / "results.json"
  written = report.write_results_json(results, path)
  loaded = json.loads(path.read_text())
  assert loaded == written == report.read_results_json(path)
  assert list(loaded) == sorted(loaded)
  assert loaded == {
    "chexpert_8x200/image_to_image/P@5": 0.5,
    "chexpert_8x200/text_to_image/P@10": 0.25,
    "rsna/zero_shot/AUC": pytest.approx(0.9),
  }


@pytest.mark.parametrize("bad", [{"a": float("nan")}, {"a": [0.1, 0.2]}, {"a": "0.5"}, {"a": True}])
def test_results_json_rejects_non_numbers(tmp_path, bad):
  with pytest.raises((TypeError, ValueError)):
    report.write_results_json(bad, tmp_path / "r.json")


# --------------------------------------------------------------------------
# Paper numbers and tables.
# --------------------------------------------------------------------------


def test_paper_results_are_complete_and_spot_checked():
  paper = report.load_paper_results()
  tables = paper["tables"]
  assert set(tables) == {"table3", "table4", "table5", "table6"}
  for table in tables.values():
    for row in table["rows"]:
      assert set(row["values"]) == set(table["columns"]), row["method"]
  t3 = {r["method"]: r["values"] for r in tables["table3"]["rows"]}
  assert t3["ClinVLA"]["chexpert_8x200/image_to_image/P@5"] == 52.5
  assert t3["ClinVLA"]["chexpert_5x200/image_to_text/P@100"] == 47.4
  assert t3["ConVIRT"]["chexpert_8x200/text_to_image/P@50"] == 46.5
  assert t3["MRM"]["chexpert_8x200/text_to_image/P@5"] is None
  t4 = {r["method"]: r["values"] for r in tables["table4"]["rows"]}
  assert [t4["ClinVLA"][f"rsna/zero_shot/{m}"] for m in ("ACC", "F1", "AUC")] == [82.5, 78.9, 91.5]
  assert t4["BioViL-T"]["chexpert_5x200/zero_shot/ACC"] == 45.7
  t5 = {r["method"]: r for r in tables["table5"]["rows"]}
  edema = "ms_cxr_t/linear_probe/Edema/ACC"
  assert (t5["ClinVLA"]["values"][edema], t5["ClinVLA"]["std"][edema]) == (69.5, 0.6)
  # Every column key is one our evaluators produce.
  for table in tables.values():
    for key in table["columns"]:
      assert key.split("/")[0] in {"chexpert_8x200", "chexpert_5x200", "rsna", "ms_cxr_t"}


def table_lines(text, title):
  block = text.split(f"**{title}**")[1].split("\n\n")[1]
  return [l for l in block.splitlines() if l.startswith("|")]


def test_markdown_report_layout(tmp_path):
  ours = {
    "chexpert_8x200/image_to_image/P@5": 0.4321,
    "rsna/zero_shot/AUC": 0.9,
    "ms_cxr_t/linear_probe/Edema/ACC": 0.65,
    "ms_cxr_t/linear_probe/Edema/ACC_std": 0.012,
  }
  path = tmp_path / "results.md"
  text = report.write_markdown(ours, path)
  assert path.read_text() == text
  paper = report.load_paper_results()
  for name in ("table3", "table4", "table5"):
    table = paper["tables"][name]
    lines = table_lines(text, table["title"])
    # Header, separator, our row, then every paper row.
    assert len(lines) == 3 + len(table["rows"])
    assert len({l.count(" | ") for l in lines}) == 1  # same column count
    assert lines[2].startswith(f"| {report.OURS_LABEL} |")
    for line, row in zip(lines[3:], table["rows"]):
      assert row["method"] in line
  t3 = table_lines(text, paper["tables"]["table3"]["title"])
  ours_cells = t3[2].strip("| ").split(" | ")
  assert ours_cells[3] == "43.2"  # fraction -> percent
  assert ours_cells[4] == report.MISSING  # not measured
  assert "| ClinVLA (paper) | MIMIC-CXR | 224 | 52.5 | 48.4 |" in text
  t4 = table_lines(text, paper["tables"]["table4"]["title"])
  assert "| 90.0 |" in t4[2]
  assert "54.9*" in text and "BioViL\u2020" in text
  t5 = table_lines(text, paper["tables"]["table5"]["title"])
  assert t5[2].endswith("| 65.0 \u00b1 1.2 |")
  assert "| 62.2 \u00b1 1.6 |" in t5[3]
  assert "| CheXRelNet | 47 | 47 | 47 | 36 | 49 |" in text


def test_column_labels():
  assert report.column_label("chexpert_8x200/text_to_image/P@10") == ("CheXpert 8x200 T\u2192I P@10")
  assert report.column_label("covid_cxr/image_to_text/P@5") == ("covid_cxr I\u2192T P@5")


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------


def test_top_hits_rank_like_metrics():
  hits = report.top_hits(np.array([0.2, 0.9, 0.2, 0.5]), ["a", "b", "c", "d"], k=3, relevant=np.array([1, 0, 1, 0]))
  assert [(h.item, h.score, h.relevant) for h in hits] == [("b", 0.9, False), ("d", 0.5, False), ("a", 0.2, True)]


def test_snippet_truncates_and_wraps():
  text = report.snippet("word " * 100, max_chars=50, width=20)
  assert len(text.replace("\n", " ")) <= 50 and text.endswith("\u2026")
  assert max(len(l) for l in text.splitlines()) <= 20


def test_retrieval_figure_writes_png(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.random((32, 32)) for _ in range(5)]
  image_hits = report.top_hits(rng.random(5), images, k=5, relevant=np.array([1, 0, 1, 1, 0]))
  reports = [f"Report {i}: mild cardiomegaly, no effusion." for i in range(5)]
  report_hits = report.top_hits(rng.random(5), reports, k=5)
  path = report.retrieval_figure(
    tmp_path / "fig" / "retrieval.png",
    text_query="enlarged cardiac silhouette",
    image_hits=image_hits,
    image_query=rng.random((32, 32, 3)),
    report_hits=report_hits,
  )
  assert path.read_bytes()[:8] == PNG_MAGIC
  pixels = matplotlib.image.imread(path)
  assert pixels.shape[0] > 300 and pixels.shape[1] > 900
  assert pixels.std() > 0  # something was drawn
  # One row only is fine too; nothing at all is an error.
  single = report.retrieval_figure(tmp_path / "one.png", text_query="x", image_hits=image_hits[:2])
  assert single.read_bytes()[:8] == PNG_MAGIC
  with pytest.raises(ValueError):
    report.retrieval_figure(tmp_path / "none.png")


# --------------------------------------------------------------------------
# run_evaluators end to end, on synthetic embeddings.
# --------------------------------------------------------------------------


def synthetic_inputs(rng, lists_dir):
  dim = 32
  protos = normalized(rng.normal(size=(16, dim)))  # rows 0-7: 8x200 classes

  def near(rows, noise=0.05):
    return normalized(protos[rows] + noise * rng.normal(size=(len(rows), dim)))

  lists = retrieval.load_chexpert_8x200(lists_dir)
  classes = retrieval.CHEXPERT_8X200_CLASSES
  cand_cls = lists.candidate_labels.argmax(axis=1)
  perm = rng.permutation(len(cand_cls))  # embedded in another order
  candidates = evaluate.EmbeddingSet(image=near(cand_cls)[perm], ids=[lists.candidate_paths[i] for i in perm])
  queries = evaluate.EmbeddingSet(
    image=near([classes.index(c) for c in lists.image_query_classes]), ids=list(lists.image_query_paths)
  )
  # Text: 8x200 queries, 5x200 prompts (rows 8-12), pneumonia (rows 13, 14).
  text_rows = {t: classes.index(c) for t, c in zip(lists.text_queries, lists.text_query_classes)}
  for i, prompts in enumerate(zeroshot.chexpert_5x200_prompts().values()):
    text_rows.update({p: 8 + i for p in prompts})
  text_rows.update({"There is pneumonia": 13, "There is no pneumonia": 14})
  text_embed_fn = lambda texts: near([text_rows[t] for t in texts])

  five = np.repeat(np.arange(5), 25)
  rsna_y = np.array([0, 1] * 30)
  covid = np.array([0, 1, 2] * 10)
  return {
    "chexpert_8x200": {"candidates": candidates, "image_queries": queries},
    "chexpert_5x200": evaluate.EmbeddingSet(
      image=near(8 + five), text=near(8 + five), labels=np.array(zeroshot.CHEXPERT_5X200_CLASSES)[five]
    ),
    # Noise-free: the tuned threshold sits just above the training negatives
    # (see metrics.best_f1_threshold), so held-out negatives must not exceed
    # them for an exact 1.0.
    "rsna": evaluate.EmbeddingSet(image=near(14 - rsna_y, noise=0.0), labels=rsna_y),
    "ms_cxr_t": {
      "Edema": evaluate.EmbeddingSet(image=np.eye(3)[five % 3] * 4 + 0.1 * rng.normal(size=(125, 3)), labels=five % 3)
    },
    "covid_cxr": evaluate.EmbeddingSet(image=near(covid), text=near(covid), labels=covid),
  }, text_embed_fn


def test_run_evaluators_end_to_end(tmp_path, chexpert_8x200_dir):
  embeddings, text_embed_fn = synthetic_inputs(np.random.default_rng(1), chexpert_8x200_dir)
  names = ["chexpert_8x200", "chexpert_5x200", "rsna", "ms_cxr_t", "covid_cxr"]
  config = {"chexpert_8x200_dir": str(chexpert_8x200_dir), "retrieval_ks": (5, 9)}
  results = evaluate.run_evaluators(names, embeddings, text_embed_fn, config)
  expected = {
    **{f"chexpert_8x200/{d}/P@{k}": 1.0 for d in ("image_to_image", "text_to_image") for k in (5, 10, 50)},
    "chexpert_5x200/image_to_text/P@5": 1.0,
    "chexpert_5x200/image_to_text/P@10": 1.0,
    # 25 per class: at most 25 of the top 100 can be relevant.
    "chexpert_5x200/image_to_text/P@100": 0.25,
    "chexpert_5x200/zero_shot/ACC": 1.0,
    "rsna/zero_shot/AUC": 1.0,
    "rsna/zero_shot/ACC": 1.0,
    "rsna/zero_shot/F1": 1.0,
    "rsna/zero_shot/ACC_std": 0.0,
    "rsna/zero_shot/F1_std": 0.0,
    "ms_cxr_t/linear_probe/Edema/ACC": 1.0,
    "ms_cxr_t/linear_probe/Edema/ACC_std": 0.0,
    **{f"covid_cxr/{d}/P@{k}": 1.0 for d in retrieval.DIRECTIONS for k in (5, 9)},
  }
  assert {k: results[k] for k in expected} == pytest.approx(expected)
  companions = ("_chance", "_ci_low", "_ci_high", "_majority", "_all_positive")
  added = set(results) - set(expected)
  assert all(k.endswith(companions) or "/R@" in k for k in added)
  assert {k for k in added if "/R@" in k and not k.endswith(companions)} == {
    f"covid_cxr/{d}/R@{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)
  }
  # Chance: 200 of the 1600 candidates per 8x200 class, 25 of 125 studies per
  # 5x200 class; RSNA is balanced, so always-positive reaches 2/3 F1.
  assert results["chexpert_8x200/text_to_image/P@50_chance"] == 0.125
  assert results["chexpert_5x200/image_to_text/P@5_chance"] == 0.2
  assert results["chexpert_5x200/zero_shot/ACC_majority"] == 0.2
  assert results["rsna/zero_shot/AUC_chance"] == 0.5
  assert results["rsna/zero_shot/ACC_majority"] == 0.5
  assert results["rsna/zero_shot/F1_all_positive"] == pytest.approx(2 / 3)
  assert results["covid_cxr/image_to_text/R@5_chance"] == pytest.approx(5 / 30)
  for key in expected:
    if f"{key}_ci_low" in results:
      assert results[f"{key}_ci_low"] <= results[key] <= results[f"{key}_ci_high"]
  written = report.write_results_json(results, tmp_path / "results.json")
  assert written == pytest.approx(results)
  text = report.write_markdown(results, tmp_path / "results.md")
  assert "| 100.0 | 100.0 | 100.0 |" in text


def test_run_evaluators_requires_list_dir():
  with pytest.raises(ValueError):
    evaluate.run_evaluators(["chexpert_8x200"], {"chexpert_8x200": {}}, None, {})


def test_console_table_fits_15_lines_with_interval_and_chance():
  results = {}
  for task in ("image_to_text", "text_to_image"):
    for k in ("P@1", "P@5", "P@10", "R@1", "R@5", "R@10"):
      key = f"covid_cxr/{task}/{k}"
      results.update({key: 0.5, f"{key}_ci_low": 0.4, f"{key}_ci_high": 0.6, f"{key}_chance": 0.25})
      if k.startswith("P@"):
        results[f"{key}_majority"] = 0.55
  results.update(
    {"covid_cxr/zero_shot/AUC": 0.64, "covid_cxr/zero_shot/ACC": 0.2, "covid_cxr/zero_shot/ACC_majority": 0.61}
  )
  lines = report.console_table(results, ["/w/results.md", "/w/retrieval_examples.png"])
  assert len(lines) <= 15
  assert lines[0].split() == ["metric", "value", "95", "%", "interval", "chance", "majority"]
  body = {line.split()[0]: line.split()[1:] for line in lines[2:-2]}
  assert body["covid_cxr/zero_shot/AUC"] == ["0.640", report.MISSING, report.MISSING, report.MISSING]
  assert body["covid_cxr/zero_shot/ACC"] == ["0.200", report.MISSING, report.MISSING, "0.610"]
  assert body["covid_cxr/image_to_text/P@5"] == ["0.500", f"0.400{report.EN_DASH}0.600", "0.250", "0.550"]
  assert body["covid_cxr/image_to_text/R@1"] == ["0.500", f"0.400{report.EN_DASH}0.600", "0.250", report.MISSING]
  # 14 scores, 11 rows: AUC, ACC, every @5 and @1, and one @10 (the others are left to results.md).
  assert len(body) == 11 and all(
    f"covid_cxr/{t}/{k}" in body for t in ("image_to_text", "text_to_image") for k in ("P@5", "R@1")
  )
  assert sum(k.endswith("@10") for k in body) == 1
  assert lines[-2].startswith(f"... {14 - len(body)} more scores")
  assert lines[-1] == "results: /w/results.md, /w/retrieval_examples.png"
  few = report.console_table({"a/AUC": 0.7}, ["r.md"])
  assert len(few) == 4 and few[2].split()[:2] == ["a/AUC", "0.700"]
