#!/bin/bash
# Training-time cost of MKL's strict reproducible mode (MKL_CBWR=AUTO,STRICT, rlekf-train's
# default) against its default mode (MKL_CBWR=AUTO), on PWmat Cu: paper-mode RLEKF 1 epoch and
# Adam 5 epochs, alternating the modes, REPS times each. Prints the training seconds of every
# run (time/train_s at the last validation).
#   bash bench/cpu/mkl_strict_cost.sh [OUT_DIR] [REPS] [MODES]
# MODES: the MKL_CBWR values to compare (default "AUTO AUTO,STRICT"; e.g. "AUTO,STRICT
# COMPATIBLE" for the mode rlekf-train picks on non-Intel CPUs).
set -euo pipefail
out=${1:-logs/mkl_strict_cost}
reps=${2:-2}
modes=${3:-"AUTO AUTO,STRICT"}
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} WANDB_MODE=offline
for r in $(seq 1 "$reps"); do
  for optim in rlekf adam; do
    epochs=$([ "$optim" = rlekf ] && echo 1 || echo 5)
    for mode in $modes; do
      dir="$out/$optim-${mode/,/_}-$r"
      MKL_CBWR=$mode .venv/bin/rlekf-train data=cu_pwmat optim=$optim trainer.max_epochs=$epochs \
        test=false logger=csv extras.print_config=false hydra.run.dir="$dir" > "$dir.log" 2>&1 \
        || { echo "failed: $dir (see $dir.log)"; exit 1; }
      s=$(.venv/bin/python -c "import sys; from rlekf.runs import read_metrics_csv; \
print(round(read_metrics_csv(sys.argv[1])[0][-1].train_time, 2))" "$dir/csv/metrics.csv")
      echo "$optim MKL_CBWR=$mode rep $r: $s s training"
    done
  done
done
