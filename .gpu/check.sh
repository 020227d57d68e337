#!/usr/bin/env bash
# `make gpu-check` without make: every GPU stage of medswav (docs/GPU.md), results in $OUT or build/gpu-check.
# Exit codes: 0 every stage ok or skipped for want of a GPU, 1 a stage failed or timed out, 2 usage.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m benchmarks.gpu_check "$@"
