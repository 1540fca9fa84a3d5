#!/usr/bin/env bash
# Build vlarl's images from the repository root: docker/Dockerfile (cpu) and docker/Dockerfile.gpu (gpu).
# Usage: bash docker/build.sh [cpu|gpu|all] [extra docker build arguments]
#   bash docker/build.sh gpu --build-arg FLASH_ATTN_WHEEL=https://.../flash_attn-...-cp311-linux_x86_64.whl
# Tags: ${VLARL_IMAGE:-vlarl}:cpu and :gpu (VLARL_IMAGE=ghcr.io/me/vlarl to push there afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"; shift || true
image="${VLARL_IMAGE:-vlarl}"
command -v docker >/dev/null || { echo "docker/build.sh: docker is not installed" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "docker/build.sh: no Docker daemon is reachable (docker info failed)" >&2; exit 2; }
build() {  # kind dockerfile
  echo "docker/build.sh: building $image:$1 from $2"
  docker build -f "$2" -t "$image:$1" "${@:3}" .
  docker run --rm "$image:$1" python -m vlarl.main --help >/dev/null  # the image runs vlarl
  echo "docker/build.sh: $image:$1 ready"
}
case "$which" in
  cpu) build cpu docker/Dockerfile "$@" ;;
  gpu) build gpu docker/Dockerfile.gpu "$@" ;;
  all) build cpu docker/Dockerfile "$@"; build gpu docker/Dockerfile.gpu "$@" ;;
  *) echo "docker/build.sh: build cpu, gpu or all, not '$which'" >&2; exit 2 ;;
esac
