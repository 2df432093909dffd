"""Tests for the pure RLEKF update (reference sections 1.3 and 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlekf.optim import rlekf_update, symmetrize_
from rlekf.optim.functional import innovation

DT = torch.float64


def _random_spd(n: int, gen: torch.Generator, scale: float = 1.0) -> torch.Tensor:
    a = torch.randn(n, n, generator=gen, dtype=DT)
    return scale * (a @ a.T / n + 0.1 * torch.eye(n, dtype=DT))


def _dense_update(P_blocks, H_blocks, w_blocks, eps, lam):
    """Dense numpy restatement of §1.3 with P = blockdiag(P_i) (the oracle)."""
    sizes = [p.shape[0] for p in P_blocks]
    n = sum(sizes)
    P = np.zeros((n, n))
    mask = np.zeros((n, n), dtype=bool)
    o = 0
    for p, m in zip(P_blocks, sizes, strict=True):
        P[o : o + m, o : o + m] = p.numpy()
        mask[o : o + m, o : o + m] = True
        o += m
    H = np.concatenate([h.numpy() for h in H_blocks])
    w = np.concatenate([x.numpy() for x in w_blocks])
    a = len(sizes) * lam + H @ P @ H
    K = P @ H
    w = w + eps / a * K
    P = np.where(mask, (P - np.outer(K, K) / a) / lam, 0.0)
    return a, w, P


def test_matches_dense_blockdiag_update() -> None:
    gen = torch.Generator().manual_seed(0)
    sizes = [4, 7, 1, 3]
    P = [_random_spd(n, gen) for n in sizes]
    H = [torch.randn(n, generator=gen, dtype=DT) for n in sizes]
    w = [torch.randn(n, generator=gen, dtype=DT) for n in sizes]
    a_ref, w_ref, P_ref = _dense_update(P, H, w, 0.7, 0.95)
    out = [torch.empty(n, dtype=DT) for n in sizes]
    ptrs = [p.data_ptr() for p in P]
    res = rlekf_update(w, P, H, 0.7, 0.95, out=out)
    assert res.applied
    assert res.innovation == pytest.approx(a_ref, rel=1e-14)
    np.testing.assert_allclose(torch.cat(w).numpy(), w_ref, rtol=0, atol=1e-14)
    np.testing.assert_allclose(torch.block_diag(*P).numpy(), P_ref, rtol=0, atol=1e-14)
    assert [p.data_ptr() for p in P] == ptrs  # in place
    assert all(inc is o for inc, o in zip(res.increments, out, strict=True))


def test_innovation_is_shared_across_blocks() -> None:
    # a = L*lam + sum_i H_i^T P_i H_i, not per block.
    P = [torch.eye(2, dtype=DT), 2 * torch.eye(3, dtype=DT)]
    H = [torch.ones(2, dtype=DT), torch.ones(3, dtype=DT)]
    a, K = innovation(P, H, 0.5)
    assert float(a) == 2 * 0.5 + 2.0 + 6.0
    assert torch.equal(K[1], 2 * torch.ones(3, dtype=DT))


def test_increments_only_when_weights_none() -> None:
    P = [torch.eye(3, dtype=DT)]
    H = [torch.tensor([1.0, 0.0, 2.0], dtype=DT)]
    res = rlekf_update(None, P, H, 2.0, 1.0)
    # a = 1 + 5 = 6, K = H, dw = 2/6 * H
    assert res.innovation == 6.0
    torch.testing.assert_close(res.increments[0], H[0] / 3, rtol=0, atol=1e-15)


@pytest.mark.parametrize(
    ("error", "bad_h"),
    [(math.nan, None), (math.inf, None), (1.0, math.nan), (1.0, math.inf), (1.0, -math.inf)],
)
def test_non_finite_inputs_skip_without_touching_state(error: float, bad_h: float | None) -> None:
    gen = torch.Generator().manual_seed(1)
    P = [_random_spd(3, gen), _random_spd(2, gen)]
    H = [torch.randn(3, generator=gen, dtype=DT), torch.randn(2, generator=gen, dtype=DT)]
    if bad_h is not None:
        H[1][0] = bad_h
    w = [torch.randn(3, generator=gen, dtype=DT), torch.randn(2, generator=gen, dtype=DT)]
    P0, w0 = [p.clone() for p in P], [x.clone() for x in w]
    res = rlekf_update(w, P, H, error, 0.98)
    assert not res.applied and res.increments == ()
    assert all(torch.equal(a, b) for a, b in zip(P, P0, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(w, w0, strict=True))


def test_non_positive_innovation_skips() -> None:
    P = [-torch.eye(2, dtype=DT)]  # not PSD: a = 0.5 - 2 < 0
    res = rlekf_update(None, P, [torch.ones(2, dtype=DT)], 1.0, 0.5)
    assert not res.applied and res.innovation == -1.5
    assert torch.equal(P[0], -torch.eye(2, dtype=DT))


def test_argument_errors() -> None:
    P, H = [torch.eye(2, dtype=DT)], [torch.ones(2, dtype=DT)]
    with pytest.raises(ValueError, match="lam"):
        rlekf_update(None, P, H, 1.0, 0.0)
    with pytest.raises(ValueError, match="shape"):
        rlekf_update(None, P, [torch.ones(3, dtype=DT)], 1.0, 1.0)
    with pytest.raises(ValueError, match="gradient blocks"):
        rlekf_update(None, P, H + H, 1.0, 1.0)
    with pytest.raises(ValueError, match="at least one"):
        rlekf_update(None, [], [], 1.0, 1.0)


def test_step_bound_independent_of_gradient_scale() -> None:
    """§5.1: ||dw|| <= (eps/2) sqrt(max_i ||P_i||_2 / (L lam)) for any H."""
    gen = torch.Generator().manual_seed(2)
    sizes = [5, 8, 3]
    lam, eps = 0.98, 0.37
    P_base = [
        _random_spd(n, gen, scale=float(s)) for n, s in zip(sizes, [1, 10, 0.1], strict=True)
    ]
    H_base = [torch.randn(n, generator=gen, dtype=DT) for n in sizes]
    p_norm = max(float(torch.linalg.matrix_norm(p, ord=2)) for p in P_base)
    bound = eps / 2 * math.sqrt(p_norm / (len(sizes) * lam))
    scales = [10.0**k for k in range(-4, 9)]
    steps = []
    for c in scales:
        P = [p.clone() for p in P_base]
        res = rlekf_update(None, P, [c * h for h in H_base], eps, lam)
        assert res.applied
        steps.append(float(torch.linalg.vector_norm(torch.cat(res.increments))))
    assert all(s <= bound * (1 + 1e-12) for s in steps)
    # The step rises, peaks where H^T P H ~ L lam, then decays like 1/scale ...
    peak = int(np.argmax(steps))
    assert 0 < peak < len(steps) - 1
    assert all(np.diff(steps[: peak + 1]) > 0) and all(np.diff(steps[peak:]) < 0)
    assert steps[-1] * scales[-1] == pytest.approx(steps[-2] * scales[-2], rel=1e-6)
    # ... whereas an SGD step eps * ||H|| explodes with the gradient.
    sgd = eps * scales[-1] * float(torch.linalg.vector_norm(torch.cat(H_base)))
    assert sgd > 1e6 * bound


def _random_updates(dtype, seed, n_updates, symmetrize_every, check):
    gen = torch.Generator().manual_seed(seed)
    sizes = [33, 12, 7, 4]  # >= SIMD width, so CPU kernels use vector body and scalar tail
    P = [torch.eye(n, dtype=dtype) for n in sizes]
    lam, nu, inflation, applied = 0.98, 0.9987, 1.0, 0
    for t in range(1, n_updates + 1):
        scale = 10.0 ** float(torch.empty(()).uniform_(-3, 3, generator=gen))
        H = [scale * torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
        eps = float(torch.randn((), generator=gen, dtype=DT))
        applied += rlekf_update(None, P, H, eps, lam).applied
        inflation /= lam
        lam = nu * lam + 1 - nu
        if symmetrize_every and t % symmetrize_every == 0:
            for p in P:
                symmetrize_(p, tile=8)
        if t % 100 == 0:
            for p in P:
                check(p.double(), inflation)
    return applied


def _asym(p: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(p - p.T))


def _min_eig_ok(p: torch.Tensor, rtol: float) -> bool:
    eig = torch.linalg.eigvalsh((p + p.T) / 2)
    return float(eig.min()) >= -rtol * float(eig.max())


@pytest.mark.parametrize("seed", [0, 1])
def test_covariance_stays_symmetric_and_psd(seed: int) -> None:
    """§5.2: 1000 random updates in float64 keep every P_i (nearly) symmetric and PSD."""

    def check(p: torch.Tensor, inflation: float) -> None:
        assert _min_eig_ok(p, 1e-10)
        # Round-off asymmetry is only ever inflated by 1/lam, never by the data ...
        assert _asym(p) <= 1e-14 * inflation
        # ... and stays tiny relative to P over 1000 updates.
        assert _asym(p) <= 1e-6 * float(torch.linalg.matrix_norm(p))

    assert _random_updates(DT, seed, 1000, 0, check) == 1000


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_periodic_symmetrization_keeps_p_exactly_symmetric(dtype: torch.dtype) -> None:
    def check(p: torch.Tensor, inflation: float) -> None:
        assert _asym(p) == 0.0  # checked right after a symmetrization
        assert _min_eig_ok(p, 1e-10 if dtype == DT else 1e-4)

    assert _random_updates(dtype, 0, 1000, 100, check) == 1000


def test_symmetrize_in_place_tiled() -> None:
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(11, 11, generator=gen, dtype=DT)
    expected = (A + A.T) / 2
    ptr = A.data_ptr()
    for tile in (3, 4, 11, 64):
        B = A.clone()
        assert symmetrize_(B, tile=tile) is B
        assert torch.equal(B, B.T)
        torch.testing.assert_close(B, expected, rtol=0, atol=1e-15)
    symmetrize_(A)
    assert A.data_ptr() == ptr and torch.equal(A, A.T)
    with pytest.raises(ValueError, match="square"):
        symmetrize_(torch.zeros(2, 3))
