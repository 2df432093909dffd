#!/bin/bash
# GPU run 1 (≤ 10 min): GPU microbenchmark, cu_pwmat training comparison, CUDA tests
cd "$(dirname "$0")/../.."
if [ -s .devdata/patches.diff ]; then git apply .devdata/patches.diff || echo "PATCH FAILED"; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:src RLEKF_SHARED_DATA=$PWD/.devdata/data WANDB_MODE=offline PYTHONUNBUFFERED=1 || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import rlekf.train, rlekf.bench, torch, lightning; print('import ok', torch.__version__, lightning.__version__, torch.cuda.get_device_name(0))" || exit 1
mkdir -p $OUT/res /tmp/w
echo "=== micro t=$SECONDS"
timeout 120 python3 -m rlekf.bench --no-train --preset cu --device cuda --tag h100 --out $OUT/res 2>&1 | tee /tmp/w/micro.log | grep -v "^\[bench\] micro"
echo "=== train t=$SECONDS"
timeout $((540 - SECONDS - 60)) python3 -m rlekf.bench --preset cu --datasets cu_pwmat --budget ${BUDGET:-90} --device cuda --adam-epochs auto --no-micro --tag h100 --out $OUT/res --work /tmp/w 2>&1 | tee /tmp/w/train.log
echo "=== pytest t=$SECONDS"
timeout $((585 - SECONDS)) python3 -m pytest -q -p no:cacheprovider -x tests/integration/test_cuda.py tests/unit/test_rlekf.py tests/unit/test_rank_k.py 2>&1 | tee /tmp/w/pytest.log | tail -40
echo "=== done t=$SECONDS"
tar czf $OUT/work.tgz --exclude='*.ckpt' -C /tmp w 2>/dev/null
ls -la $OUT $OUT/res
