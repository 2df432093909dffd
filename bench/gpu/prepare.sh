#!/bin/bash
# Prepare a GPU benchmark run on a machine WITHOUT internet whose Python (3.12) already has
# torch+CUDA, lightning, torchmetrics, matplotlib, rich, scipy, h5py, msgpack: run this here
# (with internet, in the repo root), then ship the repo with the git-ignored folders .whl,
# .devdata and data/cu_emt, and run bench/gpu/run1.sh then run2.sh there ($OUT = a folder
# for the results). What this session did on 2026-11-25 (H100): see README "Benchmark".
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
grep -qx '/.devdata/' .git/info/exclude 2>/dev/null || echo '/.devdata/' >> .git/info/exclude
mkdir -p .whl .devdata/data
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for p in hydra-core==1.3.8 omegaconf==2.3.1 ase==3.29.0 vesin==0.6.2 dpdata==1.1.0 wcmatch bracex lmdb; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d .whl "$p"
done
python3 -m pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w .whl  # sdist only on PyPI
shared=${RLEKF_SHARED_DATA:-../shared/data}
cp -r "$shared"/{cu_pwmat,water_deepmd,si_mlearn} .devdata/data/
ls .whl .devdata/data
