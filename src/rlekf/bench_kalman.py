"""The Kalman-update microbenchmark: time per update of a whole model's covariance.

For each model (the Cu and water defaults, optionally DeePMD-kit's default-size water model),
block size and ``P`` dtype it times, in one process on one machine:

* ``full``: the full-storage path of earlier versions (``K = P H`` by ``mv``, then one fused
  ``addr_`` per block: reads ``P`` twice and writes it once, ``3 * itemsize * sum n_i**2``
  bytes), through :func:`rlekf.optim.rlekf_update` on dense blocks;
* ``tiled``: :class:`rlekf.optim.RLEKF` as it is (one read and one write of the stored lower
  tiles per update, ``2 * itemsize * sum lower_tile_numel(n_i, tile)`` bytes), for each tile
  edge given, and the fused rank-``k`` update;
* a copy of a large buffer, the bandwidth yardstick (read + write counted).

Bytes moved divided by time, over the measured copy bandwidth, is the fraction of the memory
bound reached. The whole model is timed, not one block (one block can fit in a large L3).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["MODELS", "kalman_microbench", "measure_bandwidth"]

# name -> (type_map, sel, embedding, fitting)
MODELS: dict[str, tuple[list[str], list[int], tuple[int, ...], tuple[int, ...]]] = {
    "Cu": (["Cu"], [100], (25, 25, 25), (50, 50, 50)),
    "H2O": (["O", "H"], [46, 92], (25, 25, 25), (50, 50, 50)),
    # DeePMD-kit's default se_e2_a water model: ~1.03 M parameters
    "H2O-deepmd": (["O", "H"], [46, 92], (25, 50, 100), (240, 240, 240)),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeats: int, device: torch.device) -> float:
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_bandwidth(
    n_bytes: int | None = None, repeats: int = 5, device: torch.device | str = "cpu"
) -> float:
    """Copy bandwidth in bytes/s (read + write counted) of a large float64 copy; best of
    ``repeats`` (default size 1 GiB on the CPU, far above any last-level cache)."""
    device = torch.device(device)
    if n_bytes is None:
        n_bytes = (2048 if device.type == "cuda" else 1024) * 2**20
    src = torch.ones(n_bytes // 8, dtype=torch.float64, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)

    def copy(src=src, dst=dst):
        dst.copy_(src)

    best = min(_median_time(copy, 1, device) for _ in range(repeats))
    del src, dst, copy
    return 2 * n_bytes / best


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def kalman_microbench(
    models: Sequence[str] = ("Cu", "H2O"),
    block_sizes: Sequence[int] = (5120,),
    p_dtypes: Sequence[str] = ("float64", "float32"),
    tiles: Sequence[int] = (256,),
    *,
    repeats: int = 6,
    k: int = 5,
    device: torch.device | str = "cpu",
    full: bool = True,
    batch_blocks: bool | None = None,
) -> list[dict[str, Any]]:
    """Rows of ms per update and fraction of the copy bandwidth, per model, N_b, dtype, path.

    Args:
        models: Keys of :data:`MODELS`.
        block_sizes: RLEKF ``block_size`` values.
        p_dtypes: Covariance dtypes.
        tiles: Tile edges of the tiled path.
        repeats: Timed updates per row (median), after two warm-up updates.
        k: Measurements of the fused rank-``k`` row (0: none).
        device: Where the model, ``P`` and the gradients live.
        full: Also time the full-storage path (needs ``sum n_i**2`` elements of memory).
        batch_blocks: Passed to :class:`~rlekf.optim.RLEKF`.
    """
    from rlekf.models import DeepPotential
    from rlekf.optim import RLEKF, rlekf_update

    device = torch.device(device)
    bandwidth = measure_bandwidth(device=device)
    rows: list[dict[str, Any]] = []
    for name in models:
        type_map, sel, emb, fit = MODELS[name]
        model = DeepPotential(type_map, sel=sel, embedding=emb, fitting=fit).to(device)
        params = list(model.parameters())
        n_total = sum(p.numel() for p in params)
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3).to(device)
        for bs in block_sizes:
            for p_dtype in p_dtypes:
                dt = getattr(torch, p_dtype)
                base = {"model": name, "n_params": n_total, "block_size": bs, "p_dtype": p_dtype}
                if full:
                    opt = RLEKF(params, block_size=bs, max_p_bytes=None)
                    sizes = opt.block_sizes
                    P = [torch.eye(n, dtype=dt, device=device) for n in sizes]
                    H = [torch.randn(n, generator=gen, dtype=dt).to(device) * 1e-3 for n in sizes]
                    work = [torch.empty(n, dtype=dt, device=device) for n in sizes]

                    def run_full(P=P, H=H, work=work):
                        rlekf_update(None, P, H, 1e-3, 0.999, out=work)

                    for _ in range(2):
                        run_full()
                    t = _median_time(run_full, repeats, device)
                    moved = 3 * dt.itemsize * sum(n * n for n in sizes)
                    rows.append(
                        {
                            **base,
                            "path": "full (mv + addr_)",
                            "tile": "",
                            "p_gib": dt.itemsize * sum(n * n for n in sizes) / 2**30,
                            "ms_per_update": 1e3 * t,
                            "gb_moved": moved / 1e9,
                            "achieved_gbs": moved / t / 1e9,
                            "bound_gbs": bandwidth / 1e9,
                            "fraction_of_bound": moved / t / bandwidth,
                        }
                    )
                    _report(rows[-1])
                    del P, H, work, opt
                for tile in tiles:
                    opt = RLEKF(
                        params,
                        block_size=bs,
                        p_dtype=p_dtype,
                        tile=tile,
                        symmetrize_every=0,
                        batch_blocks=batch_blocks,
                    )
                    for _ in range(2):
                        opt.step(error=1e-3)  # allocate P, warm up
                    t = _median_time(lambda opt=opt: opt.step(error=1e-3), repeats, device)
                    moved = 2 * opt.p_bytes
                    row = {
                        **base,
                        "path": "tiled one-pass",
                        "tile": tile,
                        "p_gib": opt.p_bytes / 2**30,
                        "ms_per_update": 1e3 * t,
                        "gb_moved": moved / 1e9,
                        "achieved_gbs": moved / t / 1e9,
                        "bound_gbs": bandwidth / 1e9,
                        "fraction_of_bound": moved / t / bandwidth,
                    }
                    if k > 0:
                        h = (torch.randn(k, n_total, generator=gen, dtype=dt) * 1e-3).to(device)
                        e = torch.full((k,), 1e-3, dtype=torch.float64)
                        opt.step_k(e, h)
                        tk = _median_time(
                            lambda opt=opt, e=e, h=h: opt.step_k(e, h), repeats, device
                        )
                        row.update(
                            {
                                "rankk_k": k,
                                "rankk_ms_per_update": 1e3 * tk,
                                "rankk_fraction_of_bound": moved / tk / bandwidth,
                            }
                        )
                    row["peak_rss_gib"] = _peak_rss_gib()
                    rows.append(row)
                    _report(rows[-1])
                    del opt
        for p in params:
            p.grad = None
        del model, params
    return rows


def _report(row: dict[str, Any]) -> None:
    extra = ""
    if "rankk_ms_per_update" in row:
        extra = f", rank-{row['rankk_k']} {row['rankk_ms_per_update']:.1f} ms"
    print(
        f"[bench] kalman {row['model']} N_b={row['block_size']} {row['p_dtype']} {row['path']}"
        f"{' tile=' + str(row['tile']) if row['tile'] else ''}: {row['ms_per_update']:.1f} ms "
        f"({row['fraction_of_bound']:.2f} of {row['bound_gbs']:.1f} GB/s){extra}",
        flush=True,
    )
