#!/usr/bin/env bash
# On-the-fly learning during heated MD on EMT Cu (bench/cpu/otf.py, issue 17 item 3): trains the
# 300 K and the 1200 K RLEKF models (small, 4 epochs, about 2 min each on a loaded core), runs
# the MD 300 -> 1200 K without and with rlekf-otf (EMT as the reference), then trains the
# offline control on as many extra 1200 K frames as the OTF run labelled. About 15 min.
#   bash bench/cpu/otf.sh [OUT_DIR] [EPOCHS] [more bench/cpu/otf.py options, e.g. --factor 0.9]
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:-logs/bench_otf/emt_small}
EPOCHS=${2:-4}
shift $(( $# < 2 ? $# : 2 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python bench/cpu/otf.py "$OUT" --epochs "$EPOCHS" "$@"
