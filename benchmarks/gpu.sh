#!/usr/bin/env bash
# Base-config benchmarks on one GPU, at most about 8 minutes; results as JSON in OUT_DIR.
#
#   bash benchmarks/gpu.sh OUT_DIR
#
# Python: $PYTHON if set; else a python3 whose JAX already sees a GPU (the repo
# is put on PYTHONPATH, missing pure-Python dependencies are installed from
# ./.whl/*.whl if present, else from PyPI); else a fresh .venv-gpu with
# jax[cuda12] (needs network).  Each run has its own time limit, so one failure
# leaves the others' results.
#
# Runs (all base-shaped, bf16 compute, fp32 parameters; each first checks JAX
# against PyTorch in fp32 at full matmul precision):
#   vs_pytorch_bf16.json          train step as configured (text dropout 0.1:
#                                 the text tower's attention keeps the XLA path,
#                                 fused kernels have no dropout); ViT attention
#                                 on cuDNN; embedding of one frontal + report
#   vs_pytorch_bf16_nodrop.json   the same without dropout: cuDNN attention in
#                                 both towers
#   vs_pytorch_fp32.json          fp32 (TF32-free reference for the CPU numbers)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-gpu_results}"
mkdir -p "$OUT"
BATCH="${BATCH:-128}"
export PYTHONUNBUFFERED=1

have_gpu_jax() {
  "$1" - <<'EOF' 2>/dev/null
import jax, flax, optax, torch, timm, transformers
assert jax.default_backend() == "gpu", jax.default_backend()
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

run() {
  local limit="$1" name="$2"; shift 2
  echo "== $name: $*"
  # Unfiltered and unbuffered: a run stopped by its limit still shows how far it got.
  timeout "$limit" "$PY" -u benchmarks/vs_pytorch.py --config=base --batch="$BATCH" --check_batch=4 "$@" \
      --out="$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "   exit $?"; grep -E "^\[|==|train step|embed |FLOPs|agreement|Error" "$OUT/$name.log" | tail -20
}

run 190 vs_pytorch_bf16 --dtype=bfloat16 --attention_impl=cudnn --steps=10 --warmup=3
run 150 vs_pytorch_bf16_nodrop --dtype=bfloat16 --attention_impl=cudnn --dropout=false --steps=10 --warmup=3
run 120 vs_pytorch_fp32 --dtype=float32 --steps=6 --warmup=2
ls -la "$OUT"
