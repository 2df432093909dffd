"""The fused (Numba) sweep kernel against the torch kernel and a dense numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlekf.optim import RLEKF, tile_kernel
from rlekf.optim.tiled import TileGroup, pack_lower_tiles


def _group(n, count, tile, dtype, kernel, rng):
    g = TileGroup(n, count, tile, dtype, "cpu", kernel=kernel)
    dense = []
    for j in range(count):
        A = rng.normal(size=(n, n))
        S = A @ A.T / n + np.eye(n)
        S[np.triu_indices(n, 1)] += 1e-3 * rng.normal(size=n * (n - 1) // 2)  # asymmetric
        dense.append(S)
        g.load_(j, pack_lower_tiles(torch.as_tensor(S).to(dtype), tile))
    return g, dense


@pytest.mark.parametrize("symmetrize", [False, True])
@pytest.mark.parametrize(
    ("n", "count", "tile", "k", "kv"),
    [(37, 1, 8, 1, 1), (37, 1, 8, 1, 0), (50, 3, 16, 4, 2), (23, 2, 23, 3, 3), (64, 1, 5, 2, 1)],
)
def test_fused_sweep_equals_torch_sweep(n, count, tile, k, kv, symmetrize) -> None:
    """Same tiles and products as the torch kernel (float64), to rounding."""
    rng = np.random.default_rng(n + k + kv)
    a, _ = _group(n, count, tile, torch.float64, "torch", rng)
    b = TileGroup(n, count, tile, torch.float64, "cpu", kernel="fused")
    b.buffer.copy_(a.buffer)
    H = torch.as_tensor(rng.normal(size=(count, k, n)))
    Va = Vb = None
    if kv:
        V = torch.as_tensor(rng.normal(size=(count, n, kv)) * 0.1)
        Va, Vb = a.vectors(kv), b.vectors(kv)
        for j in range(count):
            Va.set_(j, V[j])
            Vb.set_(j, V[j])
    ya = a.sweep_rows_(H, Va, symmetrize=symmetrize).to(torch.float64)
    yb = b.sweep_rows_(H, Vb, symmetrize=symmetrize)
    assert yb.dtype == torch.float64
    torch.testing.assert_close(b.buffer, a.buffer, rtol=0, atol=1e-14)
    torch.testing.assert_close(yb, ya, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("k", [1, 3])
def test_fused_sweep_against_dense_numpy_float32(k: int) -> None:
    """float32 tiles: correction rounded once from float64, products accumulated in float64
    (``k = 3``: the four-row blocked products)."""
    rng = np.random.default_rng(3)
    n, tile = 45, 16
    g, dense = _group(n, 1, tile, torch.float32, "fused", rng)
    S32 = g.dense(0).numpy().astype(np.float64)  # the stored (rounded) S
    V = rng.normal(size=(n, 2)) * 0.1
    H = rng.normal(size=(1, k, n))
    g.vectors(2).set_(0, torch.as_tensor(V))
    V32 = g.vectors(2).buf[0].numpy().astype(np.float64)  # (2, n) as stored
    Y = g.sweep_rows_(torch.as_tensor(H).float(), g.vectors(2)).numpy()
    expect = S32 - V32.T @ V32
    got = g.dense(0).numpy().astype(np.float64)
    idx = np.arange(n) // tile
    lower = idx[:, None] >= idx  # the stored tiles (the upper tiles are their transposes)
    np.testing.assert_allclose(got[lower], expect[lower], rtol=1e-6, atol=1e-6)
    # Y from the stored float32 tiles, summed in float64
    S_used = np.where(lower, got, got.T)
    for j in range(k):
        np.testing.assert_allclose(Y[0, j], S_used @ H[0, j].astype(np.float32), rtol=1e-12)


def test_fused_bits_do_not_depend_on_the_thread_count() -> None:
    rng = np.random.default_rng(5)
    out = []
    threads = torch.get_num_threads()
    assert tile_kernel.available()  # Numba's pool sized before the thread count changes
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            g, _ = _group(70, 2, 16, torch.float64, "fused", rng=np.random.default_rng(1))
            V = g.vectors(1)
            V.buf.copy_(torch.as_tensor(rng.normal(size=(2, 1, 70)) * 0.1))
            H = torch.as_tensor(np.random.default_rng(2).normal(size=(2, 1, 70)))
            V.buf.copy_(torch.as_tensor(np.random.default_rng(4).normal(size=(2, 1, 70))) * 0.1)
            out.append((g.sweep_rows_(H, V).clone(), g.buffer.clone()))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0])
    assert torch.equal(out[0][1], out[1][1])


@pytest.mark.parametrize(("count", "n_chunks"), [(1, 8), (3, 8), (2, 1), (1, 50)])
def test_chunk_bounds_cover_every_item_once_and_balance(count, n_chunks) -> None:
    g = TileGroup(100, count, 16, torch.float64, "cpu")
    lay = tile_kernel.layout_arrays(g.layout)
    b = tile_kernel.chunk_bounds(lay, count, n_chunks)
    assert b[0] == 0 and b[-1] == count * len(g.layout) and len(b) == n_chunks + 1
    assert np.all(np.diff(b) >= 0)
    sizes = np.tile((lay[:, 1] - lay[:, 0]) * (lay[:, 3] - lay[:, 2]), count)
    per = [sizes[b[q] : b[q + 1]].sum() for q in range(n_chunks)]
    assert sum(per) == sizes.sum()
    if n_chunks <= len(sizes):
        assert max(per) <= sizes.sum() / n_chunks + sizes.max()


def test_kernel_option_resolves_and_refuses() -> None:
    w = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    assert RLEKF([w]).kernel == "fused"  # auto: on the CPU with Numba installed
    assert RLEKF([w], p_dtype="float32").kernel == "fused"
    assert RLEKF([w], p_dtype="float32", kernel="fused").kernel == "fused"
    assert RLEKF([w], kernel="torch").kernel == "torch"
    with pytest.raises(ValueError, match="Invalid kernel"):
        RLEKF([w], kernel="numba")
    with pytest.raises(ValueError, match="CPU only"):
        TileGroup(8, 1, 4, torch.float64, "meta", kernel="fused")


def test_fused_requested_without_numba_is_refused(monkeypatch) -> None:
    w = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    monkeypatch.setattr(tile_kernel, "available", lambda: False)
    with pytest.raises(ImportError, match="Numba"):
        RLEKF([w], kernel="fused")
    assert RLEKF([w]).kernel == "torch"  # auto falls back


def test_loaded_state_keeps_this_process_s_kernel() -> None:
    w = torch.nn.Parameter(torch.zeros(10, dtype=torch.float64))
    a = RLEKF([w], kernel="torch")
    w.grad = torch.ones(10, dtype=torch.float64)
    a.step(error=0.1)
    b = RLEKF([w], kernel="fused")
    b.load_state_dict(a.state_dict())
    assert b.kernel == "fused"
    w.grad = torch.ones(10, dtype=torch.float64)
    b.step(error=0.1)
    assert b.n_updates == 2


def test_numba_pool_follows_torch_threads_in_a_fresh_process() -> None:
    """NUMBA_NUM_THREADS is set from torch's thread count before Numba is first imported (an
    idle pool of one thread per core spins and slows concurrent 1-thread runs), unless the
    user set it."""
    import os
    import subprocess
    import sys

    code = (
        "import torch; from rlekf.optim import RLEKF; "
        "RLEKF([torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))], kernel='fused'); "
        "import numba; print(numba.config.NUMBA_NUM_THREADS)"
    )
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_NUM_THREADS"}
    for omp, user, expect in (("1", None, "1"), ("1", "2", "2")):
        env["OMP_NUM_THREADS"] = omp
        if user is not None:
            env["NUMBA_NUM_THREADS"] = user
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert out.stdout.strip().splitlines()[-1] == expect
