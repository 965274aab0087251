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

  python benchmarks/search.py --out=/tmp/search.json
  python benchmarks/search.py --rows=10000,100000,1000000 --noindexing
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time

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
_OUT = flags.DEFINE_string("out", None, "Write the JSON here too.")


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


def indexing(config_path: str) -> dict:
  import jax

  from clinvla_jax import api, config as config_lib
  from clinvla_jax.data import DEMO_DIR
  from clinvla_jax.search import Index

  config = config_lib.load_config(config_path)
  variables = api.init_params(config, jax.random.key(0))
  data = str(DEMO_DIR / "covid_cxr")
  out = {"config": config_path, "devices": jax.device_count(), "backend": jax.default_backend()}
  with tempfile.TemporaryDirectory() as tmp:
    for run in ("cold", "warm"):
      t = time.perf_counter()
      index = Index.build(config, data, os.path.join(tmp, run), variables=variables)
      dt = time.perf_counter() - t
      out[f"{run}_s"] = round(dt, 2)
      out[f"{run}_studies_per_s"] = round(len(index) / dt, 2)
    out["studies"] = len(index)
    out["precision"] = index.manifest["model"]["precision"]
    query = index.search_text  # compiled during the first query
    query("pleural effusion")
    out["text_query_ms"] = round(_best_of(lambda: query("small left pleural effusion"), 5) * 1e3, 2)
  return out


def main(argv):
  del argv
  result = {
    "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()},
    "query_latency": [query_latency(int(n), _DIM.value, _QUERIES.value, _K.value) for n in _ROWS.value],
  }
  if _INDEXING.value:
    result["indexing"] = indexing(_CONFIG.value)
  text = json.dumps(result, indent=1)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
