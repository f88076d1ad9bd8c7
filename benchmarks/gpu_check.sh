#!/usr/bin/env bash
# The GPU check in one command, from a fresh checkout (see benchmarks/README.md, "GPU check"):
#   bash benchmarks/gpu_check.sh [gpu_check.py arguments]
# 1. Installs what the GPU machine lacks: every wheel in wheels/ if that folder exists
#    (tensorboardX, zstandard: pip install --no-index --find-links wheels), then wsjax itself
#    with --no-deps (jax[cuda], flax, optax, orbax, torch, transformers are already there).
# 2. GPT-J 6B on the whole GPU: bench=gpu_check_6b (and pytest -m gpu first).
# 3. GPT-J 6B as on a 24 GB GPU: XLA_PYTHON_CLIENT_MEM_FRACTION so JAX sees 24 GiB and
#    streaming.device_memory_gb=24 in the plan: bench=gpu_check_6b_24gb.
# Each run appends one JSON line to benchmarks/results/gpu_check.jsonl. The exit status is the
# first non-zero of the two runs (3: a measured peak exceeded the plan; 1: gpu tests failed).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if [ -d wheels ] && ls wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --find-links wheels wheels/*.whl
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e . \
  || echo "gpu_check.sh: pip install failed; running from the checkout (PYTHONPATH)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" benchmarks/gpu_check.py --bench gpu_check_6b "$@"
rc=$?
total_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
if [ -n "${total_mib:-}" ]; then
  frac=$("$PY" -c "print(round(24 * 1024 / $total_mib, 4))")
  XLA_PYTHON_CLIENT_MEM_FRACTION=$frac "$PY" benchmarks/gpu_check.py --no_tests \
    --bench gpu_check_6b_24gb "$@" streaming.device_memory_gb=24
  rc24=$?
  [ "$rc" -eq 0 ] && rc=$rc24
else
  echo "gpu_check.sh: no nvidia-smi: the 24 GB run is skipped"
fi
exit "$rc"
