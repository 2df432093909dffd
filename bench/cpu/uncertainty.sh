#!/usr/bin/env bash
# Validation of the Kalman uncertainty on EMT Cu (bench/cpu/uncertainty.py): trains 4 RLEKF
# models (the Kalman model is seed 0, the committee seeds 0..3), then compares Kalman σ, the
# p0·I control and the committee. About 15 min on one loaded core with the small model.
#   bash bench/cpu/uncertainty.sh [OUT_DIR] [EPOCHS] [MODEL]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-logs/bench_uncertainty/emt_small}
EPOCHS=${2:-4}
MODEL=${3:-small}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python bench/cpu/uncertainty.py "$OUT" --epochs "$EPOCHS" --model "$MODEL"
