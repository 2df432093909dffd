#!/usr/bin/env bash
# Kalman training on virials: RLEKF with / without the virial measurement and Adam with its
# virial prefactor schedule (0.02 -> 1), same epochs, 3 seeds, on si_mlearn (scored on the
# official test split) and mapbi3_dpgen (scored on its random test split); one core.
#   bash bench/cpu/virial.sh [OUT] [extra arguments of bench/cpu/virial.py...]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-logs/virial_bench}
shift $(( $# > 0 ? 1 : 0 )) || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export WANDB_MODE=offline
.venv/bin/python bench/cpu/virial.py "$OUT" "$@"
