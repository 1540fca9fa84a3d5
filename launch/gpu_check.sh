#!/usr/bin/env bash
# The GPU verification pack: every CUDA-marked test and the GPU benchmarks within one budget (540 s by
# default), into one JSON, $OUT/gpu_check.json (OUT defaults to bench/results/gpu). See launch/gpu_check.py.
# The device image lacks Ray and vLLM: stage them first (../shared/tools/device-vllm/README.md), which
# leaves them in /tmp/site.
# Usage: bash launch/gpu_check.sh [--dry-run] [--budget-s SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" RAY_DISABLE_USAGE_STATS=1
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" launch/gpu_check.py "$@"
