"""``rlekf-bench-dist``: sharded RLEKF, memory per rank and time per update vs number of ranks.

For each model (the Cu and water se_e2_a defaults) and each number of ranks ``W``, ``W``
processes join a ``torch.distributed`` group (gloo on CPU, NCCL with one GPU per rank when
``--device cuda``) and run :class:`~rlekf.optim.ShardedRLEKF` updates on random gradients:
every update all-reduces ``[H, eps]`` (``N + 1`` numbers), the ``L`` quadratic forms and the
``N`` weight increments, and each rank streams only its own ``P_i`` blocks. Reported per
``(model, W)``: the largest shard (bytes of ``P`` on the most loaded rank, the memory that
limits the model size), the median time per update of the slowest rank, and the peak
resident memory (CPU) or peak allocated GPU memory of the most loaded rank.

Also printed: a paper estimate of the largest model whose ``P`` fits ``n`` GPUs of a given
memory (:func:`largest_model`).

On CPU the ranks share the machine's cores and memory bandwidth, so the time per update can
only fall with ``W`` where the machine has cores and bandwidth to spare; memory per rank
falls regardless. Results go to ``bench/results/<date>-<host>-dist.{md,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rlekf.bench import machine_name
from rlekf.optim.tiled import DEFAULT_TILE, DEFAULT_TILE_CUDA, lower_tile_numel
from rlekf.utils.dtypes import FLOAT_DTYPES, float_dtype

__all__ = ["largest_model", "main", "shard_bytes"]

_MODELS = {"Cu": (["Cu"], [100]), "H2O": (["O", "H"], [46, 92])}


def shard_bytes(
    n_params: int,
    block_size: int,
    world_size: int,
    p_dtype: str = "float64",
    tile: int = DEFAULT_TILE,
) -> int:
    """Bytes of the stored ``P`` on the most loaded rank for ``n_params`` split into full blocks.

    The partition is taken as ``ceil(n / block_size)`` blocks of ``block_size`` (the last one
    smaller), the shape "split big" gives a large model, balanced over the ranks by
    :func:`~rlekf.optim.assign_blocks`; each block stores its lower tiles of edge ``tile``.
    """
    from rlekf.optim import assign_blocks

    n_full, rest = divmod(int(n_params), int(block_size))
    sizes = [block_size] * n_full + ([rest] if rest else [])
    owner = assign_blocks([n * n for n in sizes], world_size)
    load = [0] * world_size
    for n, r in zip(sizes, owner, strict=True):
        load[r] += lower_tile_numel(n, tile)
    return max(load) * float_dtype(p_dtype).itemsize


def largest_model(
    n_gpus: int,
    gib_per_gpu: float,
    block_size: int,
    p_dtype: str = "float64",
    usable_fraction: float = 0.85,
    k: int = 5,
    tile: int = DEFAULT_TILE,
) -> int:
    """Largest parameter count whose sharded ``P`` fits ``n_gpus`` GPUs (paper estimate).

    Per rank: the ``P`` shard (:func:`shard_bytes`) plus the update's flat work vectors that
    every rank holds in full (``H`` and the increment, and the ``k`` gradient rows of a
    rank-``k`` update: ``(k + 3) * N`` numbers of ``p_dtype``) must fit
    ``usable_fraction * gib_per_gpu``; the rest is left to the model, its activations, the
    CUDA context and the allocator. Found by bisection on ``N``.
    """
    budget = usable_fraction * gib_per_gpu * 2**30
    item = float_dtype(p_dtype).itemsize

    def fits(n: int) -> bool:
        return shard_bytes(n, block_size, n_gpus, p_dtype, tile) + (k + 3) * n * item <= budget

    lo, hi = 1, 1
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _worker(rank: int, world: int, init: str, cfg: dict[str, Any], out: str) -> None:
    from rlekf.models import DeepPotential
    from rlekf.optim import ShardedRLEKF

    cuda = cfg["device"] == "cuda"
    torch.set_num_threads(max(1, cfg["threads"] // world))
    dist.init_process_group(
        "nccl" if cuda else "gloo", init_method=init, rank=rank, world_size=world
    )
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        type_map, sel = _MODELS[cfg["model"]]
        model = DeepPotential(type_map, sel=sel).to(device)
        opt = ShardedRLEKF(
            model.parameters(), block_size=cfg["block_size"], p_dtype=cfg["p_dtype"]
        )
        gen = torch.Generator().manual_seed(rank)
        for p in model.parameters():
            p.grad = (torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3).to(device)
        times = []
        for i in range(cfg["repeats"] + 1):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.step(error=1e-3)
            if cuda:
                torch.cuda.synchronize()
            if i:  # the first step allocates P
                times.append(time.perf_counter() - t0)
        peak = (
            torch.cuda.max_memory_allocated(device)
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
        row = torch.tensor(
            [statistics.median(times), opt.p_bytes_local, peak, len(opt.owned_blocks)],
            dtype=torch.float64,
            device=device,
        )
        rows = [torch.zeros_like(row) for _ in range(world)]
        dist.all_gather(rows, row)
        if rank == 0:
            torch.save(
                {
                    "rows": [r.cpu() for r in rows],
                    "n_params": sum(p.numel() for p in model.parameters()),
                    "n_blocks": len(opt.block_sizes),
                    "p_bytes": opt.p_bytes,
                },
                out,
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(model: str, world: int, cfg: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """Spawn ``world`` ranks for one model; return the row of the report."""
    init = f"file://{tmp}/init-{model}-{world}"
    out = str(tmp / f"{model}-{world}.pt")
    mp.spawn(_worker, args=(world, init, {**cfg, "model": model}, out), nprocs=world, join=True)
    res = torch.load(out, weights_only=False)
    rows = torch.stack(res["rows"])
    worst = int(rows[:, 1].argmax())
    return {
        "model": model,
        "ranks": world,
        "n_params": res["n_params"],
        "n_blocks": res["n_blocks"],
        "p_gib_total": res["p_bytes"] / 2**30,
        "p_gib_max_rank": float(rows[worst, 1]) / 2**30,
        "blocks_max_rank": int(rows[worst, 3]),
        "peak_gib_max_rank": float(rows[worst, 2]) / 2**30,
        "ms_per_update": 1e3 * float(rows[:, 0].max()),
    }


def report(rows: list[dict[str, Any]], cfg: dict[str, Any], out_dir: Path, tag: str) -> Path:
    """Write the Markdown and CSV report; returns the Markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.date.today().isoformat()
    base = out_dir / f"{stamp}-{tag}-dist"
    with open(f"{base}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# rlekf-bench-dist — {stamp}",
        "",
        f"Machine: {machine_name(cfg['device'])}. ShardedRLEKF rank-1 updates on random "
        f"gradients, block_size {cfg['block_size']}, P in {cfg['p_dtype']}, "
        f"{'NCCL, one GPU per rank' if cfg['device'] == 'cuda' else 'gloo, CPU processes'}"
        f", {cfg['threads']} threads shared by the ranks; median of {cfg['repeats']} updates "
        "of the slowest rank. 'max rank' = the rank holding the most P.",
        "",
        "| model | ranks | parameters | blocks | P GiB total | P GiB max rank | blocks max "
        "rank | peak GiB max rank | ms/update |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['ranks']} | {r['n_params']:,} | {r['n_blocks']} | "
            f"{r['p_gib_total']:.3f} | {r['p_gib_max_rank']:.3f} | {r['blocks_max_rank']} | "
            f"{r['peak_gib_max_rank']:.2f} | {r['ms_per_update']:.1f} |"
        )
    lines += ["", *estimate_lines(), ""]
    md = Path(f"{base}.md")
    md.write_text("\n".join(lines))
    return md


def estimate_lines(n_gpus: int = 8, gib: float = 80.0) -> list[str]:
    """The paper estimate of the largest model on ``n_gpus`` x ``gib`` GiB, as Markdown."""
    lines = [
        "Paper estimate (`rlekf.bench_distributed.largest_model`): largest parameter count N "
        f"whose P (one triangle, tiles of {DEFAULT_TILE_CUDA}) fits {n_gpus} x {gib:.0f} GiB "
        "GPUs, using 85 % of each GPU for the P shard plus "
        "(k + 3) N work numbers (k = 5); 1 GPU for comparison:",
        "",
        "| block size | P dtype | N on 1 GPU | N on 8 GPUs | P per GPU (GiB) |",
        "|---|---|---|---|---|",
    ]
    for bs in (5120, 10240, 20480):
        for dt in ("float64", "float32"):
            one = largest_model(1, gib, bs, dt, tile=DEFAULT_TILE_CUDA)
            many = largest_model(n_gpus, gib, bs, dt, tile=DEFAULT_TILE_CUDA)
            per = shard_bytes(many, bs, n_gpus, dt, DEFAULT_TILE_CUDA) / 2**30
            lines.append(f"| {bs} | {dt} | {one:,} | {many:,} | {per:.1f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["Cu", "H2O"], choices=sorted(_MODELS))
    parser.add_argument("--block-size", type=int, default=5120)
    parser.add_argument("--p-dtype", default="float64", choices=sorted(FLOAT_DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default=platform.node() or "host")
    args = parser.parse_args(argv)
    if args.device == "cuda" and max(args.ranks) > torch.cuda.device_count():
        raise SystemExit(
            f"--device cuda needs one GPU per rank: {max(args.ranks)} ranks asked, "
            f"{torch.cuda.device_count()} GPU(s) visible"
        )
    cfg = {
        "block_size": args.block_size,
        "p_dtype": args.p_dtype,
        "repeats": args.repeats,
        "device": args.device,
        "threads": args.threads,
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlekf-dist-") as tmp:
        for model in args.models:
            for world in args.ranks:
                row = run(model, world, cfg, Path(tmp))
                print(
                    f"[bench-dist] {model} x {world} ranks: {row['ms_per_update']:.1f} ms/update,"
                    f" max-rank P {row['p_gib_max_rank']:.3f} GiB",
                    flush=True,
                )
                rows.append(row)
    md = report(rows, cfg, args.out, args.tag)
    print(md.read_text())
    print(f"[bench-dist] wrote {md}")
    if not math.isfinite(sum(r["ms_per_update"] for r in rows)):
        raise SystemExit("non-finite timing")
    return 0


if __name__ == "__main__":
    main()
