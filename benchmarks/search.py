r"""Study search: indexing throughput (studies/s) and exact query latency at 10k-1M index rows.

Indexing: ``Index.build`` of the bundled demo set (converted records, 121
studies) with ``--config`` (default the demo model: a 4-layer ViT and
MiniLM, random weights, which cost the same as trained ones), once cold (the
first build compiles the encoders) and once warm, into temporary folders.
``--noindexing`` skips it.

Query latency: synthetic unit rows of ``--dim`` (default 128, the model's
``proj_dim``), ``--queries`` random unit queries answered one at a time and in
one batch, through `clinvla_jax.search.exact.top_k` (float32 numpy matrix
product + ``argpartition``), the index's search path without the model.
Text-query embedding is timed apart (``text_query_ms``) because it does not
depend on the index size.

Where indexing's time goes (``cold_stages_s``, ``warm_stages_s``): the
builder's `clinvla_jax.perf.StageTimes`: "decode" (the loader reads, decodes
and batches records), "embed_image", "embed_text" (each through to host
arrays), "read_headers" (study ids and reports of each shard), "write" (the
segment files and the manifest); "other" is the rest of the build (opening,
placing the weights, planning).

Text buckets (``--text_configs``): the real IU X-ray reports
(``--iu_reports``), cleaned, cut and tokenized as ``data_prep.iu_xray``
writes them into records, embedded by each config's text tower in its
``config.eval.batch_size`` batches, at full length and grouped by
``config.eval.text_buckets``: a cold pass (compiles) and a warm one each,
studies/s and real tokens/s of the warm pass, the tokens actually computed
(padding included) and the largest difference between the two embeddings.

  python benchmarks/search.py --out=/tmp/search.json
  python benchmarks/search.py --rows=10000,100000,1000000 --noindexing
  python benchmarks/search.py --rows= --config=configs/base.py
  python benchmarks/search.py --rows= --noindexing --text_configs=configs/demo.py,configs/base.py
"""

from __future__ import annotations

import ast
import json
import os
import platform
import sys
import tempfile
import time
from typing import Optional

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from clinvla_jax.search import exact  # noqa: E402

_ROWS = flags.DEFINE_list("rows", ["10000", "100000", "1000000"], "Index sizes (rows) to time queries on.")
_DIM = flags.DEFINE_integer("dim", 128, "Embedding size.")
_QUERIES = flags.DEFINE_integer("queries", 32, "Queries per size.")
_K = flags.DEFINE_integer("k", 10, "Results per query.")
_INDEXING = flags.DEFINE_bool("indexing", True, "Also time indexing the demo set.")
_CONFIG = flags.DEFINE_string("config", "configs/demo.py", "Config for the indexing run.")
_INDEX_BUCKETS = flags.DEFINE_string(
  "index_text_buckets",
  None,
  "config.eval.text_buckets of the indexing run, e.g. '()' (full length); default the config's.",
)
_OUT = flags.DEFINE_string("out", None, "Write the JSON here too.")
_TEXT_CONFIGS = flags.DEFINE_list("text_configs", [], "Time text embedding of the IU X-ray reports with these configs.")
_IU_REPORTS = flags.DEFINE_string(
  "iu_reports",
  os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "iu_xray", "NLMCXR_reports.tgz"
  ),
  "NLMCXR_reports.tgz (or its extracted ecgen-radiology/ folder).",
)
_TEXT_REPORTS = flags.DEFINE_integer(
  "text_reports", 512, "Reports to embed: every k-th non-empty one, so their lengths follow the set's; 0: all."
)
_TEXT_REPEATS = flags.DEFINE_integer(
  "text_repeats", 2, "Warm passes of each way, alternating (a load change hits both); the best counts."
)


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
  x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _best_of(fn, repeats: int = 3) -> float:
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def query_latency(n: int, dim: int, num_queries: int, k: int) -> dict:
  rows = unit_rows(n, dim, 0)
  queries = unit_rows(num_queries, dim, 1)
  exact.top_k(rows, queries[:1], k)  # warm the BLAS threads and pages
  single = _best_of(lambda: [exact.top_k(rows, q[None], k) for q in queries]) / num_queries
  batched = _best_of(lambda: exact.top_k(rows, queries, k)) / num_queries
  matmul = _best_of(lambda: [rows @ q for q in queries]) / num_queries
  return {
    "rows": n,
    "dim": dim,
    "k": k,
    "index_mib": round(rows.nbytes / 2**20, 1),
    "exact_ms_per_query": round(single * 1e3, 3),
    "exact_batched_ms_per_query": round(batched * 1e3, 3),
    "matmul_only_ms_per_query": round(matmul * 1e3, 3),
  }


def load_config(config_path: str):
  """The config, its text vocabulary widened to the tokenizer's when smaller.

  configs/base.py sizes its table for BioBERT's cased vocabulary (28,996)
  but, without its weights, tokenizes with the bundled uncased one (30,522),
  whose larger ids the library refuses (`embed.check_vocab_fits`).  Random
  weights cost the same either way.
  """
  from clinvla_jax import config as config_lib
  from clinvla_jax.data import tokenizer as tokenizer_lib
  from clinvla_jax.evaluate import embed

  config = config_lib.load_config(config_path)
  vocab = tokenizer_lib.Tokenizer(embed.config_vocab_path(config)).vocab_size
  config.model.text.vocab_size = max(config.model.text.vocab_size, vocab)
  return config


def indexing(config_path: str, buckets: Optional[str] = None) -> dict:
  import jax

  from clinvla_jax import api, perf
  from clinvla_jax.data import DEMO_DIR
  from clinvla_jax.search import Index

  config = load_config(config_path)
  if buckets is not None:
    config.eval.text_buckets = tuple(ast.literal_eval(buckets))
  variables = api.init_params(config, jax.random.key(0))
  data = str(DEMO_DIR / "covid_cxr")
  out = {"config": config_path, "devices": jax.device_count(), "backend": jax.default_backend()}
  out["text_buckets"] = list(config.eval.text_buckets)
  with tempfile.TemporaryDirectory() as tmp:
    for run in ("cold", "warm"):
      times = perf.StageTimes()
      t = time.perf_counter()
      index = Index.build(config, data, os.path.join(tmp, run), variables=variables, times=times, progress=False)
      dt = time.perf_counter() - t
      out[f"{run}_s"] = round(dt, 2)
      out[f"{run}_studies_per_s"] = round(len(index) / dt, 2)
      out[f"{run}_stages_s"] = times.as_dict() | {"other": round(dt - sum(times.seconds.values()), 3)}
    out["studies"] = len(index)
    out["precision"] = index.manifest["model"]["precision"]
    out["vocab_size"] = config.model.text.vocab_size
    query = index.search_text  # compiled during the first query
    query("pleural effusion")
    out["text_query_ms"] = round(_best_of(lambda: query("small left pleural effusion"), 5) * 1e3, 2)
  return out


def iu_report_tokens(config, path: str, limit: int) -> tuple[np.ndarray, np.ndarray]:
  """(input_ids, attention_mask) int32 [N, 128] of IU X-ray reports, as ``data_prep.iu_xray`` writes records."""
  from clinvla_jax.data import schema, text as text_lib, tokenizer as tokenizer_lib
  from clinvla_jax.evaluate import embed
  from data_prep import iu_xray

  texts = [
    text_lib.report_text(findings=r["findings"], impression=r["impression"]).text for r in iu_xray.read_reports(path)
  ]
  texts = [t for t in texts if t]  # the converter rejects empty reports
  if limit:
    texts = texts[:: max(1, len(texts) // limit)][:limit]
  tok = tokenizer_lib.Tokenizer(embed.config_vocab_path(config), max_len=config.data.max_text_len)
  enc = tok([text_lib.fit_text(t, tok) for t in texts])
  pad = ((0, 0), (0, schema.MAX_TEXT_LEN - enc["input_ids"].shape[1]))
  return np.pad(enc["input_ids"], pad, constant_values=tok.pad_id), np.pad(enc["attention_mask"], pad)


def _embed_all(predict, placed, ids: np.ndarray, mask: np.ndarray, batch: int) -> np.ndarray:
  out = []
  for start in range(0, len(ids), batch):
    n = min(batch, len(ids) - start)
    pad = ((0, batch - n), (0, 0))
    part = [np.pad(a[start : start + n], pad, mode="edge") for a in (ids, mask)]
    out.append(predict.texts(placed, *part)[:n])
  return np.concatenate(out)


def _computed_tokens(predict, mask: np.ndarray, batch: int) -> int:
  """Tokens the text tower runs over, padding rows and columns included."""
  from clinvla_jax import predict as predict_lib

  width = min(mask.shape[1], predict.model_config.text.max_len)
  if not predict.text_buckets:
    return -(-len(mask) // batch) * batch * width
  widths = predict_lib.text_widths(predict.text_buckets, width)
  sizes = predict_lib.sub_batch_sizes(batch, predict.mesh.size)
  total = 0
  for start in range(0, len(mask), batch):
    part = np.pad(mask[start : start + batch], ((0, max(0, start + batch - len(mask))), (0, 0)), mode="edge")
    lengths = np.minimum(predict_lib.token_lengths(part), width)
    total += sum(g.size * g.width for g in predict_lib.plan_text_groups(lengths, widths, sizes))
  return total


def text_buckets(config_path: str, reports: str, limit: int, repeats: int) -> dict:
  import dataclasses

  import jax

  from clinvla_jax import api
  from clinvla_jax.model import layers
  from clinvla_jax.predict import PredictFn, token_lengths

  config = load_config(config_path)
  ids, mask = iu_report_tokens(config, reports, limit)
  lengths = np.minimum(token_lengths(mask), config.model.text.max_len)
  bucketed = PredictFn.from_config(config)
  placed = bucketed.place(api.init_params(config, jax.random.key(0)))
  batch = bucketed.padded_batch_size(config.eval.batch_size)
  out = {
    "config": config_path,
    "reports": len(ids),
    "batch_size": batch,
    "text_buckets": list(bucketed.text_buckets),
    "real_tokens": int(lengths.sum()),
    "tokens_median": float(np.median(lengths)),
    "tokens_mean": round(float(lengths.mean()), 1),
  }
  ways = {"full_length": dataclasses.replace(bucketed, text_buckets=()), "bucketed": bucketed}
  emb, seconds = {}, {name: [] for name in ways}
  for run in ["cold"] + ["warm"] * repeats:
    for name, predict in ways.items():
      t = time.perf_counter()
      emb[name] = _embed_all(predict, placed, ids, mask, batch)
      seconds[name].append(time.perf_counter() - t)
  for name, predict in ways.items():
    warm = min(seconds[name][1:])
    out[name] = {
      "computed_tokens": _computed_tokens(predict, mask, batch),
      "cold_s": round(seconds[name][0], 2),
      "warm_s": round(warm, 2),
      "warm_runs_s": [round(x, 2) for x in seconds[name][1:]],
      "studies_per_s": round(len(ids) / warm, 2),
      "tokens_per_s": round(out["real_tokens"] / warm, 1),
    }
  out["speedup_warm"] = round(out["full_length"]["warm_s"] / out["bucketed"]["warm_s"], 3)
  out["max_abs_diff"] = float(np.abs(emb["bucketed"] - emb["full_length"]).max())
  out["precision"] = layers.auto_precision_name() if config.model.precision == "auto" else config.model.precision
  out["vocab_size"] = config.model.text.vocab_size
  return out


def main(argv):
  del argv
  result = {
    "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
    "query_latency": [query_latency(int(n), _DIM.value, _QUERIES.value, _K.value) for n in _ROWS.value],
  }
  if _INDEXING.value:
    result["indexing"] = indexing(_CONFIG.value, _INDEX_BUCKETS.value)
  if _TEXT_CONFIGS.value:
    result["text_buckets"] = [
      text_buckets(c, _IU_REPORTS.value, _TEXT_REPORTS.value, max(1, _TEXT_REPEATS.value)) for c in _TEXT_CONFIGS.value
    ]
  result["machine"]["load_avg_end"] = os.getloadavg()
  text = json.dumps(result, indent=1)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
