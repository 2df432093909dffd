#!/usr/bin/env bash
# The Kalman-speed measurements of the README (idle machine: nothing else running):
# 1. whole-model Kalman update, new storage (fused Numba and torch kernels) vs the full-storage
#    path, float64/float32, tiles;
# 2. DeePMD-kit's default-size water model with float32 P (needs ~11 GiB);
# 3. the training-step profile on cu_pwmat (paper, fused, Adam);
# 4. DeePMD-kit's default-size water model training with RLEKF on water_deepmd (float32 P,
#    fused kernel): time per update and per frame, peak memory (4 frames after 1 warm-up).
set -euo pipefail
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} WANDB_MODE=offline
echo "load before: $(cat /proc/loadavg)"
.venv/bin/rlekf-bench --no-train --micro-blocks 1024 5120 --micro-tiles 256 512 --name micro-storage "$@"
echo "load: $(cat /proc/loadavg)"
.venv/bin/rlekf-bench --no-train --micro-models H2O-deepmd --micro-blocks 5120 --micro-dtypes float32 \
  --no-full-path --micro-repeats 3 --rank-k 0 --name micro-h2o-deepmd "$@"
echo "load: $(cat /proc/loadavg)"
.venv/bin/rlekf-bench --profile --data cu_pwmat --batches 20
echo "load: $(cat /proc/loadavg)"
/usr/bin/time -v .venv/bin/rlekf-bench --profile --data water_deepmd --optims rlekf --batches 4 \
  --warmup 1 --tag "${TAG:-vm}-deepmd-size" --extra 'model.embedding=[25,50,100]' \
  'model.fitting=[240,240,240]' optim.optimizer.p_dtype=float32 optim.optimizer.kernel=fused \
  2>&1 | grep -v "^\s*\(Page\|Volun\|Invol\|Swap\|File\|Socket\|Signal\|Minor\|Major\|Average\|Exit\)"
echo "load after: $(cat /proc/loadavg)"
