#!/usr/bin/env bash
# Set up (idempotent) and run the main job: the three-stage method end to end on the built-in dataset
# (python -m reference_pipeline demo), writing runs/demo/report.md. Extra arguments go to the demo command,
# e.g. `bash scripts/demo.sh --quick` or `bash scripts/demo.sh --set distill.train.steps=600`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Idle OpenMP threads sleep instead of spinning (a DataLoader worker shares the 2 cores with the model).
export OMP_WAIT_POLICY=PASSIVE
.venv/bin/python -m reference_pipeline demo "$@"
