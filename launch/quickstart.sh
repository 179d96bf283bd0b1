#!/usr/bin/env bash
# Install into ./.venv and run the embedded default: tiny GPT, control vs intervention, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh
exec .venv/bin/slowqk quickstart "$@"
