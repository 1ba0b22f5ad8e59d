#!/usr/bin/env bash
# Set up (idempotent), build the docs with warnings as errors, then run the whole test suite with
# pytest (its summary is the last line printed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m sphinx -W --keep-going -q -b html docs docs/_build/html
echo "docs built: docs/_build/html/index.html"
# Triton kernels run on CPU tensors through the interpreter (must be set before triton is imported).
export TRITON_INTERPRET=1
.venv/bin/python -m pytest -n 2 --dist loadfile -q tests "$@"
