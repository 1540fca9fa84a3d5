#!/usr/bin/env bash
# Set up (first time) and run the main job; extra arguments are config overrides, e.g.
#   bash launch/run.sh algo=grpo trainer.iterations=20
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh libero
exec .venv/bin/python -m vlarl.main "$@"
