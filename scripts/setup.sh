#!/usr/bin/env bash
# Idempotent set-up of a fresh machine: a virtual environment in .venv with the project and every
# extra it needs for the demo, the tests and the docs. Re-running skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.instcontrast-setup
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CUDA build of torch runs on CPU too; these versions are the ones served from this kind of
# machine's disk. pyproject.toml itself only asks for ranges.
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[pipeline,triton,test,docs,bench]"
echo "$want" > "$stamp"
