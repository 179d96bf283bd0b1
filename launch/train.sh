#!/usr/bin/env bash
# Train a recipe on this machine with torchrun; the layout is checked first (world = TP x PP x DP).
#   launch/train.sh --nproc N [--tp T] [--pp P] [--dry-run] RECIPE [key.sub=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/slowqk launch "$@"
