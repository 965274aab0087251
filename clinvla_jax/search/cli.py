"""``--mode=index`` and ``--mode=search``: what they print and write (main.py parses and dispatches)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn, Optional

import jax

from clinvla_jax.search import html as html_lib
from clinvla_jax.search.index import Hit, Index, SearchIndexError

REPORT_COLUMN = 70


def run_index(config, input_path: str, output: str, checkpoint: Optional[str]) -> Index:
  try:
    index = Index.build(config, input_path, output, checkpoint=checkpoint)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      raise
    _leave_without_peers(e)
  counts = index.manifest["counts"]
  segments = len(index.manifest["segments"])
  print(
    f"index {output}: {counts['studies']} studies ({counts['with_report']} with a report), "
    f"{counts.get('rejects', 0)} rejects in {os.path.join(output, 'rejects.csv')}; "
    f"{segments} segments ({len(index.embedded_shards)} embedded by this run)",
    flush=True,
  )
  return index


def _leave_without_peers(error: Exception) -> NoReturn:
  """Exits at once when a collective failed in a multi-process run: another process is gone (killed, crashed).

  A normal exit would wait in jax.distributed's shutdown barrier for the lost
  process until the heartbeat timeout (100 s by default) and then abort.
  Nothing is lost: process 0 commits each segment whole, and rerunning the
  same commands resumes.
  """
  first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  print(
    f"error: process {jax.process_index()} of {jax.process_count()}: a collective failed ({first}); another process "
    "has probably stopped. Finished segments are kept: rerun the same commands on every process to resume.",
    file=sys.stderr,
    flush=True,
  )
  sys.stdout.flush()
  os._exit(1)  # not sys.exit: that would run the shutdown barrier


def read_queries(path: str) -> list[str]:
  """One text query per line; blank lines are skipped."""
  try:
    with open(path, encoding="utf-8") as f:
      queries = [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise SearchIndexError(f"{path}: cannot read queries ({e.strerror})") from e
  if not queries:
    raise SearchIndexError(f"{path}: no queries (one per line)")
  return queries


def table(query: str, hits: Sequence[Hit], direction: str) -> str:
  """The printed top-k of one query."""
  lines = [f"query: {query}  [{direction}]"]
  width = max([len("study_id")] + [len(h.study_id) for h in hits])
  lines.append(f"{'rank':>4}  {'score':>6}  {'study_id':{width}s}  {'date':10s}  report")
  for rank, h in enumerate(hits, start=1):
    report = " ".join(h.report.split())
    report = report if len(report) <= REPORT_COLUMN else report[: REPORT_COLUMN - 3] + "..."
    lines.append(f"{rank:>4}  {h.score:6.3f}  {h.study_id:{width}s}  {h.date or '-':10s}  {report}")
  return "\n".join(lines)


def results_json(queries: Sequence[Any], results: Sequence[Sequence[Hit]]) -> dict[str, Any]:
  return {"queries": [{"query": str(q), "results": [h.to_json() for h in r]} for q, r in zip(queries, results)]}


def run_search(
  config,
  index_dir: str,
  *,
  query: Optional[str] = None,
  queries_file: Optional[str] = None,
  query_image: Optional[str] = None,
  k: int = 10,
  target: str = "image",
  checkpoint: Optional[str] = None,
  output: Optional[str] = None,
  html_path: Optional[str] = None,
) -> dict[str, Any]:
  given = [x for x in (query, queries_file, query_image) if x]
  if len(given) != 1:
    raise SearchIndexError("give exactly one of --query, --queries or --query_image")
  index = Index.load(index_dir, config, checkpoint=checkpoint)
  if query_image:
    from clinvla_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top

    queries: list[Any] = [query_image]
    try:
      results = [index.search_image(query_image, k=k, target=target)]
    except images_lib.ImageError as e:
      raise SearchIndexError(f"--query_image: {e}") from e
    direction = f"image -> {target}"
  else:
    queries = [query] if query else read_queries(queries_file)
    results = index.search_text(queries, k=k, target=target)
    direction = f"text -> {target}"
  for q, r in zip(queries, results):
    print(table(q, r, direction) + "\n", flush=True)
  out = results_json(queries, results)
  if output:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1, ensure_ascii=False)
    print(f"results written to {output}", flush=True)
  if html_path:
    write_html(index, queries, results, html_path, direction, query_image)
    print(f"page written to {html_path}", flush=True)
  return out


def write_html(index: Index, queries, results, path: str, direction: str, query_image: Optional[str]) -> None:
  image = None
  if query_image:
    from clinvla_jax.data import images as images_lib  # pylint: disable=g-import-not-at-top

    image = images_lib.preprocess(query_image)
  page = html_lib.render(
    [{"query": q, "results": r, "image": image} for q, r in zip(queries, results)],
    index.thumbnail,
    subtitle=f"{direction} · {len(index)} studies in {index.directory}",
  )
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    f.write(page)
