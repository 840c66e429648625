#!/usr/bin/env bash
# Set up a virtual environment in .venv, install vectordb, run the memory-mapped demo.
# Usage: bash ci/demo.sh [demo args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e .
exec .venv/bin/python examples/mmap_demo.py "$@"
