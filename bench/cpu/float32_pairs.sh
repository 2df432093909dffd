#!/usr/bin/env bash
# Paired float32 / float64 P runs (same seed, data, order; only the P dtype differs), two seeds,
# on one data set; then the table of validation errors per epoch (bench/cpu/float32_pairs.py).
#   bash bench/cpu/float32_pairs.sh [DATA] [EPOCHS] [extra Hydra overrides...]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-cu_pwmat}
EPOCHS=${2:-4}
shift $(( $# > 2 ? 2 : $# )) || true
OUT=logs/float32_pairs_${DATA}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
.venv/bin/rlekf-train -m task_name="float32_pairs_${DATA}" data="$DATA" optim=rlekf \
  seed=0,1 optim.optimizer.p_dtype=float64,float32 trainer.max_epochs="$EPOCHS" test=false \
  logger=csv callbacks.last_checkpoint.keep=false "hydra.sweep.dir=$OUT" "$@"
.venv/bin/python bench/cpu/float32_pairs.py "$OUT"
