"""A/B of the fused sweep kernel against its version at an earlier commit, in one process.

    OMP_NUM_THREADS=2 .venv/bin/python bench/cpu/kernel_ab.py REV [--repeats 6]

Loads ``src/rlekf/optim/_tile_numba.py`` as of ``REV`` (``git show``) beside the current one
and times ``RLEKF.step`` / ``step_k`` on the whole Cu model's blocks (N_b 5120, 7 blocks,
float64 and float32 P, rank 1 and rank 5), alternating the two kernels on the same P so that
drifts of the machine hit both alike; prints medians as a Markdown table. Idle machine only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rlekf.optim import RLEKF, tile_kernel
from rlekf.optim._tile_numba import sweep_kernel as current

CU_BLOCKS = [1350, 5120, 5120, 5120, 4640, 2650, 2651]


def _old_kernel(rev: str):
    src = subprocess.run(
        ["git", "show", f"{rev}:src/rlekf/optim/_tile_numba.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "_tile_numba_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("_tile_numba_old", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.sweep_kernel


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rev", help="git revision of the kernel to compare with")
    parser.add_argument("--repeats", type=int, default=6)
    args = parser.parse_args()
    kernels = {args.rev: _old_kernel(args.rev), "current": current}
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    print(
        f"Fused kernel A/B, {_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC, HEAD {head} "
        f"(+ working tree) vs {args.rev}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
        f"load {os.getloadavg()[0]:.2f}; Cu blocks {CU_BLOCKS}, medians of {args.repeats}\n"
    )
    print(f"| P dtype | rank | {args.rev} (ms/update) | current (ms/update) | speed-up |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(1)
    for dtype in ("float64", "float32"):
        ps = [torch.nn.Parameter(torch.zeros(n, dtype=torch.float64)) for n in CU_BLOCKS]
        opt = RLEKF(ps, block_size=5120, p_dtype=dtype, symmetrize_every=0, kernel="fused")
        for k in (1, 5):
            rows = torch.randn(k, sum(CU_BLOCKS), generator=gen, dtype=torch.float64) * 1e-3
            errs = torch.full((k,), 1e-3, dtype=torch.float64)
            times: dict[str, list[float]] = {name: [] for name in kernels}
            for rep in range(args.repeats + 2):
                for name, kern in kernels.items():
                    tile_kernel._kernel = lambda kern=kern: kern
                    t0 = time.perf_counter()
                    opt.step_k(errs, rows)
                    if rep >= 2:  # the first two: compilation and warm-up
                        times[name].append(time.perf_counter() - t0)
            med = {n: 1e3 * sorted(v)[len(v) // 2] for n, v in times.items()}
            print(
                f"| {dtype} | {k} | {med[args.rev]:.1f} | {med['current']:.1f} | "
                f"{med[args.rev] / med['current']:.2f}× |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
