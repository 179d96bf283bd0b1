#!/usr/bin/env bash
# Install into ./.venv (CPU torch) and run the test suite. The README's second command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install.sh dev,eval,deepspeed
# two workers, each test file on one of them (module fixtures such as the Slurm cluster stay whole):
# most tests wait on process start-up and imports, which overlap well on 2 cores
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
