#!/usr/bin/env bash
# Stage part K of the GPU kit on the GPU machine (one run-tool call per part; docs/GPU.md):
#   bash .gpu/stage.sh K        with build/gpu-kit/part-KK carried in the same call
# Copies the part into $MEDSWAV_GPU_STAGE (default /tmp/medswav-gpu-kit) after checking its sha256.
# Exit codes: 0 staged, 1 missing or corrupted part, 2 usage.
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ne 1 || ! "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: bash .gpu/stage.sh K  (K = part number, from 1)" >&2
  exit 2
fi
part=$(printf "build/gpu-kit/part-%02d" "$((10#$1))")
if [[ ! -d "$part" ]]; then
  echo "error: $part was not carried into this call (carry it: see python -m benchmarks.gpu_kit plan)" >&2
  exit 1
fi
exec "${PYTHON:-python3}" -m benchmarks.gpu_kit stage "$part"
