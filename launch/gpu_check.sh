#!/usr/bin/env bash
# Every CUDA-marked test and the GPU benchmarks, in one go, for a lent GPU machine; results under $OUT
# (default bench/results/gpu). The device image lacks Ray and vLLM: stage them first
# (../shared/tools/device-vllm/README.md), which leaves them in /tmp/site.
# Usage: bash launch/gpu_check.sh            (about 13 minutes on an H200; the 7B folder is written once)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results/gpu}"
mkdir -p "$OUT"
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" RAY_DISABLE_USAGE_STATS=1
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
timeout 300 "$PY" -m pytest tests/gpu -q -rs --junitxml "$OUT/gpu_tests.xml" 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
timeout 420 "$PY" bench/openvla_7b.py --out "$OUT/openvla_7b.json" 2>&1 | tail -30 | tee "$OUT/openvla_7b.txt"
timeout 240 "$PY" bench/flow_denoise.py --real --repeats 3 --out "$OUT/flow_denoise.json" 2>&1 | grep -v Warn \
  | tail -20 | tee "$OUT/flow_denoise.txt"
echo "results in $OUT"
