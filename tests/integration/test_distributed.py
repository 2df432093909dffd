"""ShardedRLEKF on 2 gloo ranks (spawned processes) vs. single-process RLEKF."""

from __future__ import annotations

import gc
import math
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from rlekf.optim import RLEKF, ShardedRLEKF, assign_blocks, state_covariance

WORLD = 2
N_STEPS = 10
HALF = 3  # samples per rank and step
NAN_STEP = 3  # rank 1 reports a NaN error here: every rank (and the reference) must skip
BLOCK_SIZE = 64  # 353 parameters -> blocks [64, 64, 64, 64, 64, 33]
TIMEOUT_S = 300  # collectives and rendezvous; the ranks start within seconds of each other


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    ).double()


def _batch(t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(WORLD * HALF, 3, generator=g, dtype=torch.float64)
    y = torch.randn(WORLD * HALF, generator=g, dtype=torch.float64)
    return x, y


def _measure(model: nn.Module, t: int, rank: int) -> float:
    """Back-propagate this rank's half of batch t; return its error (label - prediction)."""
    x, y = _batch(t)
    sl = slice(rank * HALF, (rank + 1) * HALF)
    pred = model(x[sl]).mean()
    pred.backward()
    if t == NAN_STEP and rank == 1:
        return math.nan
    return float(y[sl].mean() - pred.detach())


def _measure_k(model: nn.Module, t: int, rank: int) -> tuple[torch.Tensor, list]:
    """One measurement per sample of this rank's half: ``k = HALF`` errors and gradient sets."""
    x, y = _batch(t)
    params = list(model.parameters())
    errs, grads = [], []
    for j in range(rank * HALF, (rank + 1) * HALF):
        pred = model(x[j : j + 1]).sum()
        grads.append(torch.autograd.grad(pred, params))
        errs.append(float(y[j] - pred.detach()))
    if t == NAN_STEP and rank == 1:
        errs[1] = math.nan
    return torch.tensor(errs, dtype=torch.float64), grads


def _make_opt(model: nn.Module, cls: type = ShardedRLEKF) -> RLEKF:
    return cls(model.parameters(), block_size=BLOCK_SIZE, p0=1.0)


def _run_rank(
    rank: int, tmp: str, tag: str, load_tag: str | None, start: int, stop: int, rank_k: bool
) -> None:
    """This rank's steps ``start..stop-1``; writes ``<tag>-rank<rank>.pt``."""
    model = _make_model()
    opt = _make_opt(model)
    if load_tag is not None:
        ck = torch.load(f"{tmp}/{load_tag}-rank{rank}.pt", weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
    for t in range(start, stop):
        if rank_k:  # the fused mode's entry point: step(errors, grads=...) -> step_k
            errs, grads = _measure_k(model, t, rank)
            opt.step(errs, grads=grads)
        else:
            model.zero_grad()
            opt.step(_measure(model, t, rank))
    full = opt.gather_state_dict(dst=0)
    torch.save(
        {
            "model": model.state_dict(),
            "opt": opt.state_dict(),
            "full": full,
            "owned": opt.owned_blocks,
            "p_bytes_local": opt.p_bytes_local,
            "p_bytes": opt.p_bytes,
        },
        f"{tmp}/{tag}-rank{rank}.pt",
    )


def _worker(
    rank: int, tmp: str, tag: str, load_tag: str | None, start: int, stop: int, rank_k: bool
) -> None:
    """One spawned rank. Teardown order matters under load:

    1. the optimizer holds the process group and sits in a reference cycle, so it would
       otherwise be freed by the garbage collector during interpreter shutdown, after
       ``destroy_process_group``, when gloo's threads can no longer take the GIL (a SIGABRT,
       "terminate called without an active exception"): collect it while the process is alive;
    2. a barrier, so that no rank tears its connections down while the other one is still in
       a collective;
    3. ``destroy_process_group``, which now drops the last reference to the group.
    A timeout turns a lost peer into an error instead of a 30-minute hang.
    """
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{tmp}/init-{tag}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=TIMEOUT_S),
    )
    try:
        _run_rank(rank, tmp, tag, load_tag, start, stop, rank_k)
        gc.collect()
        dist.barrier()
    finally:
        gc.collect()
        dist.destroy_process_group()


def _spawn(
    tmp: Path, tag: str, load_tag: str | None, start: int, stop: int, rank_k: bool = False
) -> list[dict]:
    args = (str(tmp), tag, load_tag, start, stop, rank_k)
    mp.spawn(_worker, args=args, nprocs=WORLD, join=True)
    return [torch.load(tmp / f"{tag}-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _reference(n: int) -> tuple[nn.Module, RLEKF]:
    """Single-process RLEKF fed the gradient and error averaged over the two halves."""
    model = _make_model()
    opt = _make_opt(model, RLEKF)
    params = list(model.parameters())
    for t in range(n):
        grads, errs = [], []
        for r in range(WORLD):
            model.zero_grad()
            errs.append(_measure(model, t, r))
            grads.append([p.grad.clone() for p in params])
        for p, g0, g1 in zip(params, *grads, strict=True):
            p.grad = (g0 + g1) / WORLD
        opt.step((errs[0] + errs[1]) / WORLD)
    return model, opt


def _reference_k(n: int) -> tuple[nn.Module, RLEKF]:
    """Single-process rank-k RLEKF fed the (k, N) gradient rows and errors averaged over ranks."""
    model = _make_model()
    opt = _make_opt(model, RLEKF)
    for t in range(n):
        rows, errs = [], []
        for r in range(WORLD):
            e, grads = _measure_k(model, t, r)
            rows.append(torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads]))
            errs.append(e)
        opt.step_k((errs[0] + errs[1]) / WORLD, (rows[0] + rows[1]) / WORLD)
    return model, opt


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    scale = max(1.0, float(b.abs().max()))
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * scale


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, list[dict]]:
    tmp = tmp_path_factory.mktemp("dist")
    return tmp, _spawn(tmp, "full10", None, 0, N_STEPS)


def test_sharded_matches_single_process(uninterrupted) -> None:
    _, res = uninterrupted
    ref_model, ref_opt = _reference(N_STEPS)
    assert ref_opt.n_updates == N_STEPS - 1 and ref_opt.n_skipped == 1
    ref_P = ref_opt.covariance
    assert len(ref_P) >= 4

    # sharding: disjoint, complete, balanced by n_i^2
    owned = [set(r["owned"]) for r in res]
    assert owned[0].isdisjoint(owned[1]) and owned[0] | owned[1] == set(range(len(ref_P)))
    assert sum(r["p_bytes_local"] for r in res) == res[0]["p_bytes"] == ref_opt.p_bytes
    assert max(r["p_bytes_local"] for r in res) <= 0.6 * ref_opt.p_bytes

    for r in res:  # identical weights on every rank, equal to the reference
        for k, v in ref_model.state_dict().items():
            assert _close(r["model"][k], v), k
        meta = r["opt"]["sharding"]
        assert meta["world_size"] == WORLD and meta["owned_blocks"] == sorted(r["owned"])
        anchor = r["opt"]["state"][0]
        assert anchor["lam"] == pytest.approx(ref_opt.lam, abs=1e-15)
        assert anchor["n_updates"] == N_STEPS - 1 and anchor["n_skipped"] == 1
        for i, p in zip(meta["owned_blocks"], state_covariance(r["opt"]), strict=True):
            assert _close(p, ref_P[i], 1e-10), i

    full = res[0]["full"]
    assert res[1]["full"] is None
    gathered = state_covariance(full)
    assert len(gathered) == len(ref_P)
    for p, q in zip(gathered, ref_P, strict=True):
        assert _close(p, q, 1e-10)

    # the gathered dict is a plain RLEKF checkpoint, loadable by RLEKF and by a 1-rank shard
    for cls in (RLEKF, ShardedRLEKF):
        opt = _make_opt(_make_model(), cls)
        opt.load_state_dict(full)
        assert opt.lam == ref_opt.lam and opt.n_updates == N_STEPS - 1
        for p, q in zip(opt.covariance, ref_P, strict=True):
            assert _close(p, q, 1e-10)


def test_sharded_rank_k_matches_single_process(tmp_path) -> None:
    res = _spawn(tmp_path, "k", None, 0, N_STEPS, rank_k=True)
    ref_model, ref_opt = _reference_k(N_STEPS)
    assert ref_opt.n_updates == HALF * (N_STEPS - 1) and ref_opt.n_skipped == HALF
    ref_P = ref_opt.covariance
    for r in res:
        for k, v in ref_model.state_dict().items():
            assert _close(r["model"][k], v), k
        anchor = r["opt"]["state"][0]
        assert anchor["lam"] == pytest.approx(ref_opt.lam, abs=1e-15)
        assert anchor["n_updates"] == ref_opt.n_updates and anchor["n_skipped"] == HALF
    gathered = state_covariance(res[0]["full"])
    assert len(gathered) == len(ref_P)
    for p, q in zip(gathered, ref_P, strict=True):
        assert _close(p, q, 1e-10)
    # not a trivial pass: the weights moved
    assert not torch.equal(res[0]["model"]["0.weight"], _make_model().state_dict()["0.weight"])


def test_resume_per_rank_files_equals_uninterrupted(uninterrupted) -> None:
    tmp, full10 = uninterrupted
    _spawn(tmp, "first5", None, 0, 5)
    res = _spawn(tmp, "resumed", "first5", 5, N_STEPS)  # fresh processes, fresh optimizers
    for a, b in zip(res, full10, strict=True):
        for k, v in b["model"].items():
            assert torch.equal(a["model"][k], v), k
        sa, sb = a["opt"]["state"][0], b["opt"]["state"][0]
        assert sa["lam"] == sb["lam"] and sa["n_updates"] == sb["n_updates"]
        assert sa["n_skipped"] == sb["n_skipped"] == 1
        for p, q in zip(sa["P"], sb["P"], strict=True):
            assert torch.equal(p, q)


def test_load_shard_on_other_world_size_refuses(uninterrupted) -> None:
    _, res = uninterrupted
    opt = _make_opt(_make_model())  # no process group: one rank
    assert opt.world_size == 1 and opt.owned_blocks == tuple(range(len(opt.blocks)))
    with pytest.raises(ValueError, match=r"saved by rank 0 of 2 ranks.*1 rank"):
        opt.load_state_dict(res[0]["opt"])


def test_assign_blocks_balanced_and_deterministic() -> None:
    costs = [n * n for n in (5120, 5120, 300, 5120, 2000, 17, 5120, 4000)]
    owner = assign_blocks(costs, 3)
    assert owner == assign_blocks(costs, 3)
    loads = [sum(c for c, o in zip(costs, owner, strict=True) if o == r) for r in range(3)]
    assert max(loads) - min(loads) <= max(costs)
    assert assign_blocks(costs, 1) == (0,) * len(costs)
    assert sorted(set(assign_blocks([1, 1], 4))) == [0, 1]  # idle ranks allowed
