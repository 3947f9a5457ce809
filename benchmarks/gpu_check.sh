#!/usr/bin/env bash
# The prepared GPU check: run it first when a GPU is lent (one call, under 8 minutes), then put
# its table in benchmarks/README.md. `--dry-run` rehearses every step on the CPU (CI runs it).
#   bash benchmarks/gpu_check.sh [--dry-run]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu_check.py "$@"
