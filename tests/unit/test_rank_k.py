"""The opt-in rank-k ("fused") RLEKF update against the exact rank-1 one."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from rlekf.data import keys as K
from rlekf.optim import RLEKF, rlekf_update, rlekf_update_rank_k
from rlekf.training.updaters import KalmanUpdater
from tests.helpers import measurements as M
from tests.helpers.frames import cu_frame, model_and_batch

DT = torch.float64
SMALL = {"embedding": (4, 8), "fitting": (8, 8), "axis_neuron": 4}


def _spd(n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, n, dtype=DT, generator=gen)
    return x @ x.T / n + 0.3 * torch.eye(n, dtype=DT)


def _problem(sizes: list[int], k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    P = [_spd(n, gen) for n in sizes]
    rows = torch.randn(k, sum(sizes), dtype=DT, generator=gen)
    eps = torch.randn(k, dtype=DT, generator=gen).abs()
    return P, rows, eps


def _split_cols(rows: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
    return [c.mT for c in torch.split(rows, sizes, dim=1)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# --------------------------------------------------------------------------- functional
@pytest.mark.parametrize("lam", [1.0, 0.98])
def test_rank_k_with_one_measurement_equals_rank_1(lam: float) -> None:
    sizes = [6, 11, 3]
    P, rows, eps = _problem(sizes, 1)
    P1 = [p.clone() for p in P]
    w1 = [torch.zeros(n, dtype=DT) for n in sizes]
    wk = [torch.zeros(n, dtype=DT) for n in sizes]
    r1 = rlekf_update(w1, P1, [c[:, 0] for c in _split_cols(rows, sizes)], float(eps[0]), lam)
    rk = rlekf_update_rank_k(P, _split_cols(rows, sizes), eps, lam, weights=wk)
    assert r1.applied and rk.applied
    assert rk.innovation.shape == (1, 1)
    assert float(rk.innovation[0, 0]) == pytest.approx(r1.innovation, rel=1e-14)
    for a, b in zip(P, P1, strict=True):
        assert _rel(a, b) < 1e-14
    for a, b in zip(wk, w1, strict=True):
        assert _rel(a, b) < 1e-14


def _sequential_full(P_blocks, rows, eps, L: int):
    """k sequential rank-1 global-EKF updates on the FULL blockdiag(P), R = L, lambda = 1.

    Each later error is taken at the updated weights of the linearized model.
    """
    Pf = torch.block_diag(*P_blocks)
    w = torch.zeros(Pf.shape[0], dtype=DT)
    for h, e in zip(rows, eps, strict=True):
        e_now = e - h @ w
        k = Pf @ h
        a = L + h @ k
        w = w + k * (e_now / a)
        Pf = Pf - torch.outer(k, k) / a
    return w, Pf


def test_rank_k_equals_sequential_rank_1_one_block() -> None:
    """GEKF (L = 1), lambda = 1: rank-k == k sequential calls of rlekf_update."""
    n, k = 40, 5
    P, rows, eps = _problem([n], k, seed=1)
    Pk = [P[0].clone()]
    wk = [torch.zeros(n, dtype=DT)]
    res = rlekf_update_rank_k(Pk, [rows.mT], eps, 1.0, weights=wk)
    assert res.applied
    Ps = [P[0].clone()]
    ws = [torch.zeros(n, dtype=DT)]
    for h, e in zip(rows, eps, strict=True):
        e_now = float(e - h @ ws[0])  # error of the linearized model at the updated weights
        assert rlekf_update(ws, Ps, [h], e_now, 1.0).applied
    assert _rel(wk[0], ws[0]) < 1e-10
    assert _rel(Pk[0], Ps[0]) < 1e-10


def test_rank_k_equals_sequential_rank_1_several_blocks() -> None:
    """L blocks, lambda = 1: rank-k == the diagonal blocks of k sequential updates on the full
    blockdiag(P) (R = L). Sequential BLOCK-diagonal rank-1 updates differ at second order."""
    sizes, k = [13, 7, 20, 1], 5
    P, rows, eps = _problem(sizes, k, seed=2)
    Pk = [p.clone() for p in P]
    wk = [torch.zeros(n, dtype=DT) for n in sizes]
    res = rlekf_update_rank_k(Pk, _split_cols(rows, sizes), eps, 1.0, weights=wk)
    assert res.applied
    w_ref, P_ref = _sequential_full(P, rows, eps, len(sizes))
    assert _rel(torch.cat(wk), w_ref) < 1e-10
    off = 0
    for p, n in zip(Pk, sizes, strict=True):
        assert _rel(p, P_ref[off : off + n, off : off + n]) < 1e-10
        off += n

    # the paper's sequential block-diagonal updates (same H's, relinearized errors) differ
    Ps = [p.clone() for p in P]
    ws = [torch.zeros(n, dtype=DT) for n in sizes]
    for h, e in zip(rows, eps, strict=True):
        e_now = float(e - h @ torch.cat(ws))
        rlekf_update(ws, Ps, list(torch.split(h, sizes)), e_now, 1.0)
    assert _rel(torch.cat(ws), w_ref) > 1e-6


@pytest.mark.parametrize("bad", ["error", "h", "inf_h", "not_pd"])
def test_rank_k_non_finite_or_indefinite_skips_without_touching_state(bad: str) -> None:
    sizes, k = [5, 4], 3
    P, rows, eps = _problem(sizes, k, seed=3)
    if bad == "error":
        eps[1] = math.nan
    elif bad == "h":
        rows[2, 3] = math.nan
    elif bad == "inf_h":
        rows[0, 7] = math.inf
    else:  # negative definite P makes A indefinite
        P = [-p for p in P]
    before = [p.clone() for p in P]
    w = [torch.ones(n, dtype=DT) for n in sizes]
    res = rlekf_update_rank_k(P, _split_cols(rows, sizes), eps, 0.99, weights=w)
    assert not res.applied and res.increments == ()
    for p, b in zip(P, before, strict=True):
        assert torch.equal(p, b)
    assert all(torch.equal(x, torch.ones_like(x)) for x in w)


def test_rank_k_argument_errors() -> None:
    P, rows, eps = _problem([4, 3], 2)
    with pytest.raises(ValueError, match="lam"):
        rlekf_update_rank_k(P, _split_cols(rows, [4, 3]), eps, 0.0)
    with pytest.raises(ValueError, match="expected"):
        rlekf_update_rank_k(P, _split_cols(rows, [4, 3]), eps[:1], 1.0)
    with pytest.raises(ValueError, match="gradient blocks"):
        rlekf_update_rank_k(P, _split_cols(rows, [4, 3])[:1], eps, 1.0)


def test_rank_k_keeps_covariance_symmetric_psd() -> None:
    P, rows, eps = _problem([30], 5, seed=4)
    for _ in range(20):
        rlekf_update_rank_k(P, [rows.mT], eps, 0.98)
    p = P[0]
    assert _rel(p, p.mT) < 1e-13
    assert float(torch.linalg.eigvalsh(0.5 * (p + p.mT)).min()) > 0


# --------------------------------------------------------------------------- optimizer
def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(DT)


def test_step_k_with_one_measurement_equals_step() -> None:
    a, b = _mlp(0), _mlp(0)
    oa, ob = RLEKF(a.parameters(), block_size=8), RLEKF(b.parameters(), block_size=8)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(3, dtype=DT, generator=gen)
        a(x).sum().backward()
        oa.step(error=0.3)
        oa.zero_grad()
        grads = torch.autograd.grad(b(x).sum(), list(b.parameters()))
        ob.step_k([0.3], [grads])
    assert oa.n_updates == ob.n_updates == 3
    assert oa.lam == ob.lam  # bitwise: same expression for k = 1
    assert oa.last_innovation == pytest.approx(ob.last_innovation, rel=1e-13)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert _rel(pb.detach(), pa.detach()) < 1e-13
    for pa, pb in zip(oa.covariance, ob.covariance, strict=True):
        assert _rel(pb, pa) < 1e-13


def test_step_k_counters_schedule_and_state_dict_round_trip() -> None:
    model = _mlp(1)
    params = list(model.parameters())
    opt = RLEKF(params, block_size=10, symmetrize_every=7)
    n_total = sum(p.numel() for p in params)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(5, n_total, dtype=DT, generator=gen)
    opt.step_k(torch.rand(5, dtype=DT, generator=gen), rows)
    assert opt.n_updates == 5 and opt.n_skipped == 0
    assert opt.lam == pytest.approx(1 - 0.02 * 0.9987**5, rel=1e-15)
    opt.step_k([0.1, 0.2], rows[:2])
    assert opt.n_updates == 7 and opt.lam == pytest.approx(1 - 0.02 * 0.9987**7, rel=1e-15)
    for p in opt.covariance:  # crossed a multiple of symmetrize_every: exactly symmetric
        assert torch.equal(p, p.mT)
    opt.step_k([math.nan, 0.1], rows[:2])
    assert opt.n_updates == 7 and opt.n_skipped == 2

    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = _mlp(1)
    with torch.no_grad():
        for q, p in zip(other.parameters(), params, strict=True):
            q.copy_(p)
    opt2 = RLEKF(other.parameters(), block_size=10, symmetrize_every=7)
    opt2.load_state_dict(torch.load(buf, weights_only=False))
    assert (opt2.lam, opt2.n_updates, opt2.n_skipped) == (opt.lam, opt.n_updates, opt.n_skipped)
    for a, b in zip(opt.covariance, opt2.covariance, strict=True):
        assert torch.equal(a, b) and b.dtype == DT
    # both continue identically
    opt.step_k([0.3, 0.1, 0.2], rows[2:])
    opt2.step_k([0.3, 0.1, 0.2], rows[2:])
    for a, b in zip(params, other.parameters(), strict=True):
        assert torch.equal(a, b)


def test_step_k_forgets_like_k_paper_updates() -> None:
    """Zero gradients: k paper updates divide P by lam_t ... lam_{t+k-1}; step_k does too."""
    a, b = _mlp(3), _mlp(3)
    oa, ob = RLEKF(a.parameters(), block_size=10), RLEKF(b.parameters(), block_size=10)
    n_total = sum(p.numel() for p in a.parameters())
    for _ in range(5):
        for p in a.parameters():
            p.grad = torch.zeros_like(p)
        oa.step(error=0.1)
    ob.step_k([0.1] * 5, torch.zeros(5, n_total, dtype=DT))
    assert ob.lam == pytest.approx(oa.lam, rel=1e-15)
    for pa, pb in zip(oa.covariance, ob.covariance, strict=True):
        assert _rel(pb, pa) < 1e-14


def test_step_with_grads_forwards_to_step_k_and_validates() -> None:
    model = _mlp(2)
    opt = RLEKF(model.parameters(), block_size=None)
    n_total = sum(p.numel() for p in model.parameters())
    opt.step(error=torch.tensor([0.1, 0.2]), grads=torch.ones(2, n_total, dtype=DT))
    assert opt.n_updates == 2
    with pytest.raises(ValueError, match="expected"):
        opt.step_k([0.1, 0.2], torch.ones(2, n_total + 1, dtype=DT))
    with pytest.raises(ValueError, match="gradient sets"):
        opt.step_k([0.1, 0.2], [[None] * 4])


# --------------------------------------------------------------------------- updater
@pytest.fixture(scope="module")
def setup():
    frames = [cu_frame(1, rattle=0.15, seed=s) for s in range(3)]  # 4-atom cells
    model, batch = model_and_batch(frames, ["Cu"], [60], rcut=5.0, **SMALL)
    return model, batch


def _flat(grads, params) -> torch.Tensor:
    pairs = zip(grads, params, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in pairs])


def _dot_grads(model) -> torch.Tensor:
    return _flat([p.grad for p in model.parameters()], list(model.parameters()))


def test_fused_measurements_equal_paper_measurements_at_same_weights(setup):
    model, batch = setup
    params = list(model.parameters())
    up = KalmanUpdater(n_select=8, group_size=2, seed=5, mode="fused")
    groups = torch.randint(4, (8,), generator=torch.Generator().manual_seed(1)).reshape(-1, 2)
    eps, grads, _ = up.fused_measurements(model, batch, 4, groups, params)
    assert eps.shape == (5,) and len(grads) == 5

    paper = KalmanUpdater(n_select=8, group_size=2, seed=5)
    model.zero_grad()
    e0, _ = paper.energy_measurement(model, batch, 4)
    assert torch.equal(eps[0], e0)
    assert torch.allclose(_flat(grads[0], params), _dot_grads(model), rtol=1e-12, atol=1e-15)
    for j, group in enumerate(groups, start=1):
        model.zero_grad()
        ej, _ = paper.force_measurement(model, batch, 4, group)
        assert torch.equal(eps[j], ej)
        assert torch.allclose(_flat(grads[j], params), _dot_grads(model), rtol=1e-12, atol=0)
    model.zero_grad()


def test_fused_measurements_match_hand_reference(setup):
    """Every one of the k fused measurements against the numpy/finite-difference reference
    (tests/helpers/measurements.py), at the batch's starting weights: ε by hand, H·v by central
    differences of the signed, scaled prediction over the weights."""
    model, batch = setup
    params = list(model.parameters())
    up = KalmanUpdater(energy_prefactor=1.5, force_prefactor=2.0, mode="fused")
    groups = torch.tensor([[0, 2], [3, 3], [1, 0]])  # a repeated atom counts twice
    eps, grads, _ = up.fused_measurements(model, batch, 4, groups, params)
    assert eps.shape == (4,) and len(grads) == 4
    e = M.predict(model, batch, forces=False)[K.ENERGY]
    f = M.predict(model, batch, forces=True)[K.FORCES]
    refs = [M.energy_reference(batch[K.ENERGY], e, 4, 1.5)]
    refs += [M.force_reference(batch[K.FORCES], f, 4, g, 2.0) for g in groups]
    for j, ((ref_eps, signs), g_j) in enumerate(zip(refs, grads, strict=True)):
        assert float(eps[j]) == pytest.approx(ref_eps, rel=1e-12), j
        if j == 0:

            def scalar(o, signs=signs):
                return M.energy_scalar(o, signs, 4, 1.5)

        else:

            def scalar(o, signs=signs, g=groups[j - 1]):
                return M.force_scalar(o, signs, 4, g, 2.0)

        h = _flat(g_j, params)
        for v in M.random_directions(model, 2, seed=j):
            fd = M.fd_directional(model, batch, scalar, v, forces=j > 0)
            assert float(h @ v) == pytest.approx(fd, rel=1e-6, abs=1e-12), j
    model.zero_grad()


def test_fused_update_makes_k_updates_with_one_rank_k_step(setup):
    model, batch = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = RLEKF(model.parameters(), block_size=64)
    calls = []
    orig = opt.step_k
    opt.step_k = lambda e, g: calls.append(len(e)) or orig(e, g)  # type: ignore[method-assign]
    up = KalmanUpdater(n_select=8, group_size=2, seed=3, mode="fused")
    out = up.update(model, batch, opt).predictions
    assert calls == [5] and opt.n_updates == 5 and opt.n_skipped == 0
    assert opt.lam == pytest.approx(1 - 0.02 * 0.9987**5)
    assert K.FORCES in out and not out[K.FORCES].requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the atom draws use the generator exactly as paper mode does (one draw of n_select)
    ref = torch.Generator().manual_seed(3)
    torch.randint(4, (8,), generator=ref)
    assert torch.equal(up.generator.get_state(), ref.get_state())
    model.load_state_dict(state)


def test_fused_update_first_step_matches_paper_energy_update(setup):
    """With only the energy measurement (k = 1) fused and paper mode are the same update."""
    model, batch = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    w0 = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    inc = {}
    for mode in ("paper", "fused"):
        model.load_state_dict(state)
        opt = RLEKF(model.parameters(), block_size=64)
        KalmanUpdater(train_force=False, mode=mode).update(model, batch, opt)
        inc[mode] = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - w0
        assert opt.n_updates == 1
    assert float(inc["paper"].abs().max()) > 0
    assert _rel(inc["fused"], inc["paper"]) < 1e-10
    model.load_state_dict(state)


def test_invalid_mode():
    with pytest.raises(ValueError, match="mode"):
        KalmanUpdater(mode="fast")


def test_short_fused_training_run_reaches_measured_validation_force_rmse(tmp_path):
    """Mirror of the integration test for paper mode, with ``optim=rlekf_fused``."""
    from tests.helpers.hydra import FAST_DATA, FUSED_LEVEL, compose_cfg, fit_from_cfg

    overrides = [
        "optim=rlekf_fused",
        "model=small",
        "logger=none",
        "callbacks=none",
        "trainer.max_epochs=4",
        "extras.print_config=false",
        "test=false",
        *FAST_DATA,
        "data.batch_size=1",
    ]
    cfg = compose_cfg("train", overrides, tmp_path, tmp_path / "data")
    assert cfg.optim.updater.mode == "fused"
    trainer, before, after = fit_from_cfg(cfg)
    opt = trainer.optimizers[0]
    n_batches = trainer.global_step  # one global step per fused batch
    assert opt.n_updates == 5 * n_batches == 720  # the level is reached within this many
    assert after < FUSED_LEVEL, (before, after)
