#!/usr/bin/env bash
# Train a recipe on this machine with N processes (torchrun); world size = TP x PP x DP.
#   launch/train.sh NPROC RECIPE [key=value ...]
set -euo pipefail
if [ "$#" -lt 2 ]; then
  echo "usage: $0 NPROC RECIPE [key.sub=value ...]" >&2
  exit 2
fi
nproc="$1"; shift
recipe="$1"; shift
cd "$(dirname "$0")/.."
exec .venv/bin/torchrun --standalone --nproc-per-node "$nproc" -m slowqk.cli train "$recipe" "$@"
