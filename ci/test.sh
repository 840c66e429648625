#!/usr/bin/env bash
# Set up a virtual environment in .venv, install vectordb with its test extra, check
# formatting, lint, types and import layering, run the tests (on NumPy, then on numba).
# Usage: bash ci/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[test]'
echo "ruff format --check; ruff check; mypy (strict) on vectordb/; lint-imports (layers in pyproject.toml)"
.venv/bin/python -m ruff format --check --quiet .
.venv/bin/python -m ruff check --quiet .
.venv/bin/python -m mypy vectordb
.venv/bin/lint-imports --no-cache
.venv/bin/python -m pytest "$@"
# The suite runs on NumPy (tests/conftest.py); the numba backend must pick the same
# candidates and neighbours (its distances an ulp apart), so the suite runs again on it
# (where numba imports).
if .venv/bin/python -c "import vectordb.backends.numba_backend" 2>/dev/null; then
    echo "again on the numba backend (VECTORDB_BACKEND=numba)"
    VECTORDB_BACKEND=numba exec .venv/bin/python -m pytest -q "$@"
fi
