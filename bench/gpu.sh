#!/usr/bin/env bash
# Every Triton kernel's benchmark on a CUDA GPU in one run, all figures in one JSON file
# (bench/results/gpu.json unless --out PATH). Exits with status 2 and says why without CUDA.
#   bench/gpu.sh [--out PATH] [--repeats N]
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" bench/gpu.py "$@"
