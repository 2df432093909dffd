#!/bin/bash
# Issue #14 section 4: where the epoch-to-epoch jumps of RLEKF's validation energy on si_mlearn
# come from. Paper-mode RLEKF (virial + energy + 4 force measurements per frame), validated
# 4 times per epoch (val/energy_mean_error: the signed offset part of the energy RMSE), with the
# StepSizeLog callback (per batch: signed energy offset before the update and the change the
# update makes). Two runs side by side (OMP_NUM_THREADS=1), one per seed.
#   bash bench/cpu/energy_jumps.sh OUT [EPOCHS] [SEEDS] [NAME] [OVERRIDES...]
# Summary: .venv/bin/python bench/cpu/energy_jumps.py OUT
set -euo pipefail
# optim.updater.train_virial=true: the results in README were measured with the Kalman virial
# measurement, on by default for si_mlearn until 2026-12-07
OUT=${1:?output folder}
EPOCHS=${2:-3}
SEEDS=${3:-"0 1"}
NAME=${4:-default}
shift $(( $# < 4 ? $# : 4 ))
mkdir -p "$OUT"
for seed in $SEEDS; do
  run="$OUT/${NAME}_seed_${seed}"
  OMP_NUM_THREADS=1 .venv/bin/rlekf-train data=si_mlearn optim=rlekf logger=csv seed="$seed" \
    optim.updater.train_virial=true \
    trainer.max_epochs="$EPOCHS" trainer.val_check_interval=0.25 test=false \
    +callbacks.step_sizes._target_=rlekf.training.callbacks.StepSizeLog \
    callbacks.rich_progress_bar=null extras.print_config=false \
    paths.output_dir="$run" hydra.run.dir="$run" "$@" > "$run.log" 2>&1 &
done
wait
