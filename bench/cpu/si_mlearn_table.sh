#!/bin/bash
# Issue #14 section 3: the mlearn Si table. Train with rlekf-bench (si_mlearn: training.extxyz, its
# validation split picks the best checkpoint: by val/force_rmse, or val/score with SELECT=score),
# then, once per run, on the official test split (test.extxyz, never used for any choice): evaluate
# the best checkpoint as trained and after refitting the energy bias on the run's TRAINING split
# (rlekf-change-bias split=train: same data preset and seed, so the same split), per mlearn group.
#   bash bench/cpu/si_mlearn_table.sh OUT BUDGET_S "SEEDS" "OPTIMS"
#   e.g. bash bench/cpu/si_mlearn_table.sh logs/si600 600 "0 1 2" "rlekf rlekf_fused adam"
# EXTRA="..." adds Hydra overrides to every training run (e.g. a smoke test:
# EXTRA="trainer.min_epochs=0 +trainer.limit_train_batches=4 +trainer.limit_val_batches=2").
# SELECT=score picks each run's best checkpoint by the validation score (energy RMSE / 2.21e-3 +
# force RMSE / 0.06, the preset's targets; rlekf-bench --select) instead of the force RMSE.
# Then: .venv/bin/python bench/cpu/si_mlearn_table.py OUT
set -euo pipefail
OUT=${1:?output folder}
BUDGET=${2:-600}
SEEDS=${3:-"0 1 2"}
OPTIMS=${4:-"rlekf rlekf_fused adam"}
PY=.venv/bin
mkdir -p "$OUT"
echo "$(date -u +%FT%TZ) $(git rev-parse --short HEAD) select=${SELECT:-force} load: $(cut -d' ' -f1-3 /proc/loadavg)" > "$OUT/started.txt"
# shellcheck disable=SC2086
$PY/rlekf-bench --preset full --datasets si_mlearn --budget "$BUDGET" --seeds $SEEDS \
  --optims $OPTIMS --no-micro --work "$OUT/work" --out "$OUT" --name "si-${BUDGET}s" \
  --select "${SELECT:-force}" \
  ${EXTRA:+--extra $EXTRA} \
  > "$OUT/bench.log" 2>&1
for run in "$OUT"/work/si_mlearn/seed*/*/; do
  seed=$(basename "$(dirname "$run")"); seed=${seed#seed}
  best=$(ls "$run"/checkpoints/best_weights_*.ckpt 2>/dev/null | head -1)
  [ -n "$best" ] || { echo "no best checkpoint in $run" >&2; continue; }
  $PY/rlekf-eval ckpt_path="$best" data=si_mlearn split=test group_by=group progress=false \
    seed="$seed" hydra.run.dir="$run/test_raw" paths.output_dir="$run/test_raw" > "$run/test_raw.log" 2>&1
  $PY/rlekf-change-bias "$best" data=si_mlearn split=train seed="$seed" \
    output="$run/best_bias.ckpt" hydra.run.dir="$run/bias" paths.output_dir="$run/bias" > "$run/bias.log" 2>&1
  $PY/rlekf-eval ckpt_path="$run/best_bias.ckpt" data=si_mlearn split=test group_by=group \
    progress=false seed="$seed" hydra.run.dir="$run/test_bias" paths.output_dir="$run/test_bias" \
    > "$run/test_bias.log" 2>&1
done
echo "$(date -u +%FT%TZ) done load: $(cut -d' ' -f1-3 /proc/loadavg)" >> "$OUT/started.txt"
