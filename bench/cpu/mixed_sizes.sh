#!/bin/bash
# Issue #14 section 4: RLEKF on data of mixed frame sizes (si_mlearn: 12-96 atoms per frame).
# Paper-mode RLEKF (virial + energy + 4 force measurements per frame) with the paper's 1/n force
# normalisation and with a fixed one (optim.updater.force_norm_atoms=64, the most common size),
# the StepSizeLog callback recording each batch's weight step against its atom count.
#   bash bench/cpu/mixed_sizes.sh OUT [EPOCHS] [SEEDS]
# Summary: .venv/bin/python bench/cpu/mixed_sizes.py OUT
set -euo pipefail
# optim.updater.train_virial=true: the results in README were measured with the Kalman virial
# measurement, on by default for si_mlearn until 2026-12-07
OUT=${1:?output folder}
EPOCHS=${2:-4}
SEEDS=${3:-0}
for seed in $SEEDS; do
  for norm in null 64; do
    run="$OUT/norm_${norm}_seed_${seed}"
    OMP_NUM_THREADS=1 .venv/bin/rlekf-train data=si_mlearn optim=rlekf logger=csv seed="$seed" \
      optim.updater.train_virial=true \
      optim.updater.force_norm_atoms="$norm" trainer.max_epochs="$EPOCHS" \
      +callbacks.step_sizes._target_=rlekf.training.callbacks.StepSizeLog \
      callbacks.rich_progress_bar=null extras.print_config=false \
      paths.output_dir="$run" hydra.run.dir="$run" > "$run.log" 2>&1 &
  done
  wait
done
