#!/usr/bin/env bash
# The GPU check in one command, from a fresh checkout (see benchmarks/README.md, "GPU check"):
#   benchmarks/gpu_check.sh [gpu_check.py arguments]
# Installs wsjax (offline: --no-deps when jax/flax/optax/orbax are there, --no-build-isolation
# so pip fetches no build backend), then runs benchmarks/gpu_check.py, which prints and appends
# one JSON line to benchmarks/results/gpu_check.jsonl and runs `pytest -m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if "$PY" -c "import jax, flax, optax, orbax.checkpoint" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || echo "gpu_check.sh: pip install failed; running from the checkout (PYTHONPATH)"
else
  "$PY" -m pip install -q -e .
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu_check.py "$@"
