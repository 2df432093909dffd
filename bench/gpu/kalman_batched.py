"""GPU check of the Kalman update (issue: a GPU step without per-block launches).

Times one rank-1 update and one rank-5 update of the whole Cu and water default models' P on
CUDA, per-block (batch_blocks=False) against equal-size blocks batched into one call per tile
(batch_blocks=True), float64 and float32 P, and checks that the two paths agree. Prepared for
a lent device (run3.sh); no device was lent when it was written.

    python bench/gpu/kalman_batched.py [OUT_DIR]
"""

from __future__ import annotations

import json
import sys
import time

import torch

from rlekf.models import DeepPotential
from rlekf.optim import RLEKF


def _time(fn, repeats=20):
    torch.cuda.synchronize()
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2]


def main(out: str | None = None) -> int:
    dev = torch.device("cuda")
    rows = []
    for name, tm, sel in (("Cu", ["Cu"], [100]), ("H2O", ["O", "H"], [46, 92])):
        model = DeepPotential(tm, sel=sel).to(dev)
        params = list(model.parameters())
        gen = torch.Generator().manual_seed(0)
        grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype).to(dev) * 1e-3 for p in params]
        n = sum(p.numel() for p in params)
        rows_h = (torch.randn(5, n, generator=gen, dtype=torch.float64) * 1e-3).to(dev)
        errs = torch.full((5,), 1e-3, dtype=torch.float64)
        for bs in (1024, 5120):
            for p_dtype in ("float64", "float32"):
                res = {}
                for batch in (False, True):
                    opt = RLEKF(
                        params, block_size=bs, p_dtype=p_dtype, batch_blocks=batch, tile=512
                    )
                    for p, g in zip(params, grads, strict=True):
                        p.grad = g.clone()
                    t1 = _time(lambda opt=opt: opt.step(error=1e-3))
                    tk = _time(lambda opt=opt, e=errs, h=rows_h: opt.step_k(e, h))
                    res[batch] = (t1, tk, [c.double().cpu() for c in opt.covariance])
                    del opt
                agree = max(
                    float((a - b).abs().max() / b.abs().max())
                    for a, b in zip(res[False][2], res[True][2], strict=True)
                )
                row = {
                    "model": name,
                    "block_size": bs,
                    "p_dtype": p_dtype,
                    "per_block_ms": 1e3 * res[False][0],
                    "batched_ms": 1e3 * res[True][0],
                    "per_block_rank5_ms": 1e3 * res[False][1],
                    "batched_rank5_ms": 1e3 * res[True][1],
                    "max_rel_diff": agree,
                }
                print(json.dumps(row), flush=True)
                rows.append(row)
    if out:
        with open(f"{out}/kalman_batched.json", "w") as fh:
            json.dump({"device": torch.cuda.get_device_name(), "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else None))
