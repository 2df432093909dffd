#!/bin/bash
# GPU run 2 (≤ 10 min): water_deepmd and si_mlearn training comparisons on the GPU
cd "$(dirname "$0")/../.."
if [ -s .devdata/patches.diff ]; then git apply .devdata/patches.diff || echo "PATCH FAILED"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src RLEKF_SHARED_DATA=$PWD/.devdata/data WANDB_MODE=offline PYTHONUNBUFFERED=1 || exit 1
mkdir -p /tmp/res /tmp/w
echo "=== water t=$SECONDS"
timeout $((585 - SECONDS - 190)) python3 -m rlekf.bench --preset full --datasets water_deepmd --budget ${WB:-80} --device cuda --adam-epochs auto --no-micro --tag h100 --name water --out /tmp/res --work /tmp/w 2>&1 | tee /tmp/w/water.log | grep "^\[bench\]\|^|\|^- "
echo "=== si t=$SECONDS"
timeout $((585 - SECONDS)) python3 -m rlekf.bench --preset full --datasets si_mlearn --budget ${SB:-35} --device cuda --adam-epochs auto --no-micro --tag h100 --name si --out /tmp/res --work /tmp/w 2>&1 | tee /tmp/w/si.log | grep "^\[bench\]\|^|\|^- "
echo "=== done t=$SECONDS"
cp /tmp/res/*.md /tmp/res/*.png $OUT/ 2>/dev/null
cp /tmp/res/*-water.csv /tmp/res/*-si.csv $OUT/ 2>/dev/null
tar czf $OUT/work2.tgz --exclude='*.ckpt' -C /tmp w res 2>/dev/null
ls -la $OUT
