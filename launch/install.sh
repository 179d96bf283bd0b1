#!/usr/bin/env bash
# Create ./.venv and install SlowQK with the given extras (comma-separated), CPU torch by default.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python_bin="${PYTHON:-python3.11}"
command -v "$python_bin" >/dev/null 2>&1 || python_bin=python3
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch first, pinned: on CPU machines this resolves to the CPU wheel
.venv/bin/python -m pip install --quiet "torch==${TORCH_VERSION:-2.13.0}"
# setuptools announces every editable install that maps folders (patches/ -> slowqk.patches) with
# a page of text; it is information only, so it is silenced here and nothing else is.
target="."
[ -n "$extras" ] && target=".[${extras}]"
PYTHONWARNINGS="ignore:Editable installation" .venv/bin/python -m pip install --quiet -e "$target"
