#!/usr/bin/env bash
# Base-config benchmarks on one GPU, about 8 minutes at most; results as JSON in OUT_DIR.
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Python: $PYTHON if set; else a python3 whose JAX already sees a GPU (the repo
# is put on PYTHONPATH, missing pure-Python dependencies are installed from
# ./.whl/*.whl if present, else from PyPI); else a fresh .venv-gpu with
# jax[cuda12] (needs network).  Each run has its own time limit and writes its
# JSON after every phase, so a run stopped by its limit keeps what it measured
# and the runs after it still happen.
#
# Runs, most important first (all base-shaped, bf16 compute, fp32 parameters;
# each first checks JAX against PyTorch in fp32 at full matmul precision on 4
# studies):
#   vs_pytorch_bf16.json          train step as configured (text dropout 0.1:
#                                 the text tower's attention keeps the XLA path,
#                                 fused kernels have no dropout); ViT attention
#                                 on cuDNN; embedding of a batch of studies
#                                 (frontal + report)
#   embed_latency_bf16.json       embedding of one study at a time (batch 1)
#   vs_pytorch_bf16_nodrop.json   the train step without dropout: cuDNN
#                                 attention in both towers
#   vs_pytorch_fp32.json          fp32 (TF32 off in the check only)
#
# Environment: BATCH (128), CONFIG (base), ATTENTION (cudnn), ALLOW_CPU (0; 1
# runs the same sequence on a CPU backend, to check the script itself, e.g.
# CONFIG=tiny BATCH=2 ATTENTION=xla ALLOW_CPU=1), ONLY (empty: every run; else
# comma-separated run names, e.g. ONLY=vs_pytorch_bf16; the others are skipped).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_results}"
mkdir -p "$OUT"
BATCH="${BATCH:-128}"
CONFIG="${CONFIG:-base}"
ATTENTION="${ATTENTION:-cudnn}"
ALLOW_CPU="${ALLOW_CPU:-0}"
export PYTHONUNBUFFERED=1
# JAX would otherwise take 75 % of the GPU's memory up front, leaving PyTorch
# in the same process too little.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.45}"

export ALLOW_CPU
have_gpu_jax() {
  "$1" - <<'EOF' 2>/dev/null
import jax, flax, optax, torch, timm, transformers
import os
assert jax.default_backend() == "gpu" or os.environ.get("ALLOW_CPU") == "1", jax.default_backend()
EOF
}

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv-gpu/bin/python ]] && have_gpu_jax .venv-gpu/bin/python; then
    PY=.venv-gpu/bin/python
  elif have_gpu_jax python3; then
    PY=python3
  else
    echo "no python with GPU JAX found: creating .venv-gpu (needs network)" >&2
    python3 -m venv .venv-gpu
    .venv-gpu/bin/python -m pip install -q --upgrade pip
    .venv-gpu/bin/python -m pip install -q -e ".[test]" "jax[cuda12]==0.10.2"
    PY=.venv-gpu/bin/python
  fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import ml_collections, absl" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/clinvla_site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/clinvla_site"
  else
    "$PY" -m pip install -q ml-collections absl-py
  fi
fi

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__)"
} | tee "$OUT/device.txt"

LOG="$OUT/runs.log"   # every run's output, in order; also echoed live
run() {
  local limit="$1" name="$2"; shift 2
  if [[ -n "${ONLY:-}" && ",$ONLY," != *",$name,"* ]]; then
    echo "== $name: skipped (ONLY=$ONLY)" | tee -a "$LOG"
    return 0
  fi
  echo "== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$PY" -u benchmarks/vs_pytorch.py --config="$CONFIG" --batch="$BATCH" --check_batch=4 "$@" \
      --out="$OUT/$name.json" 2>&1 | grep --line-buffered -v -E "Unable to initialize backend|^W[0-9]{4} " | tee -a "$LOG"
  local rc="${PIPESTATUS[0]}"
  echo "== $name: exit $rc (124: stopped at its ${limit} s limit), ${SECONDS} s since the start" \
      | tee -a "$LOG"
}

run 170 vs_pytorch_bf16 --dtype=bfloat16 --attention_impl="$ATTENTION" --steps=10 --warmup=3
run 80 embed_latency_bf16 --dtype=bfloat16 --attention_impl="$ATTENTION" --parts=embed --embed_batch=1 \
    --steps=30 --warmup=5
run 130 vs_pytorch_bf16_nodrop --dtype=bfloat16 --attention_impl="$ATTENTION" --dropout=false --steps=10 --warmup=3
run 110 vs_pytorch_fp32 --dtype=float32 --steps=6 --warmup=2
echo "== summaries"
grep -h -A6 "^== ClinVLA" "$LOG"
ls -la "$OUT"
