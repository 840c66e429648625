#!/usr/bin/env bash
# Set up .venv with the benchmark extra (peers, data, plots) and run the quick benchmark:
# pydocs-minilm, fashion-mnist, glove-50 and synthetic-100k, one thread, vectordb beside faiss
# (IVFFlat, IVFRaBitQ), ScaNN, hnswlib and usearch.
# Usage: bash ci/bench.sh [bench/run.py args...]  (default: --dataset all --quick)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[bench]'
if [ "$#" -eq 0 ]; then set -- --dataset all --quick; fi
exec .venv/bin/python bench/run.py "$@"
