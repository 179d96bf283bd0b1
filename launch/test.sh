#!/usr/bin/env bash
# Install into ./.venv (CPU torch) and run the test suite. The README's second command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh dev,eval,deepspeed
exec .venv/bin/python -m pytest -q "$@"
