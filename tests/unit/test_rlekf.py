"""Tests for the RLEKF torch.optim optimizer against independent dense references."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from rlekf.optim import RLEKF

LAMBDA0, NU = 0.98, 0.9987


# --------------------------------------------------------------------------- helpers
def _mlp(seed: int, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """3 -> 5 -> 1 tanh MLP; parameters W1 (5,3), b1 (5), W2 (1,5), b2 (1): N = 26."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).to(dtype)


def _data(n: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 3)), rng.normal(size=n)


def _one_sample() -> tuple[np.ndarray, float]:
    xs, ys = _data(1)
    return xs[0], float(ys[0])


def _flat_params(model: nn.Module) -> np.ndarray:
    return np.concatenate([p.detach().double().reshape(-1).numpy() for p in model.parameters()])


def _np_mlp(w: np.ndarray, x: np.ndarray) -> tuple[float, np.ndarray]:
    """Numpy forward pass and gradient d(pred)/dw of the MLP, in p.reshape(-1) order."""
    W1, b1, W2, b2 = w[:15].reshape(5, 3), w[15:20], w[20:25].reshape(1, 5), w[25]
    h = np.tanh(W1 @ x + b1)
    pred = float(W2[0] @ h + b2)
    dz = W2[0] * (1.0 - h**2)
    H = np.concatenate([np.outer(dz, x).ravel(), dz, h, [1.0]])
    return pred, H


def _dense_reference(w, xs, ys, block_sizes, lambda0=LAMBDA0, nu=NU, p0=1.0):
    """Dense EKF in numpy with P forced to block-diagonal after each update (§5.3)."""
    n = w.size
    mask = np.zeros((n, n), dtype=bool)
    o = 0
    for m in block_sizes:
        mask[o : o + m, o : o + m] = True
        o += m
    assert o == n
    w, P, lam = w.copy(), p0 * np.eye(n), lambda0
    for x, y in zip(xs, ys, strict=True):
        pred, H = _np_mlp(w, x)
        err = y - pred
        a = len(block_sizes) * lam + H @ P @ H
        K = P @ H
        w = w + err / a * K
        P = np.where(mask, (P - np.outer(K, K) / a) / lam, 0.0)
        lam = nu * lam + 1.0 - nu
    return w, P, lam


def _kf_step(model: nn.Module, opt: RLEKF, x: np.ndarray, y: float) -> float:
    opt.zero_grad()
    pred = model(torch.as_tensor(x, dtype=next(model.parameters()).dtype)).sum()
    pred.backward()
    err = y - pred.item()
    opt.step(error=err)
    return err


# --------------------------------------------------------------------------- reference checks
@pytest.mark.parametrize(
    ("block_size", "sizes"),
    [
        (None, [26]),  # GEKF
        (26, [26]),
        (6, [6, 6, 3, 5, 6]),  # W1 split into 6, 6, 3; b1 alone; W2 + b2 gathered
        (4, [4, 4, 4, 3, 4, 1, 4, 1, 1]),
        (1, [1] * 26),
    ],
)
def test_matches_dense_blockdiag_ekf(block_size: int | None, sizes: list[int]) -> None:
    model = _mlp(0)
    w0 = _flat_params(model)
    opt = RLEKF(model.parameters(), block_size=block_size)
    assert opt.block_sizes == sizes
    xs, ys = _data(20)
    for x, y in zip(xs, ys, strict=True):
        _kf_step(model, opt, x, y)
    w_ref, P_ref, lam_ref = _dense_reference(w0, xs, ys, sizes)
    np.testing.assert_allclose(_flat_params(model), w_ref, rtol=1e-12, atol=1e-12)
    P = torch.block_diag(*opt.covariance).numpy()
    np.testing.assert_allclose(P, P_ref, rtol=1e-12, atol=1e-12)
    assert opt.lam == pytest.approx(lam_ref, rel=1e-15)
    assert opt.n_updates == 20 and opt.n_skipped == 0


def test_innovation_uses_all_blocks() -> None:
    """a = L*lam + sum_i H_i^T P_i H_i, ONE scalar over all blocks (reference §1.3): checked
    against that formula on P before each update, and against what a per-block innovation
    a_i = lam + H_i^T P_i H_i would have given (the increments then differ)."""
    xs, ys = _data(4)
    model = _mlp(0)
    opt = RLEKF(model.parameters(), block_size=6)
    L = len(opt.block_sizes)
    assert L == 5
    for x, y in zip(xs, ys, strict=True):
        P = [p.numpy().copy() for p in opt.covariance]
        lam = opt.lam
        w = _flat_params(model)
        pred, H = _np_mlp(w, x)
        bounds = np.cumsum([0, *opt.block_sizes])
        Hb = [H[bounds[i] : bounds[i + 1]] for i in range(L)]
        quads = [h @ p @ h for h, p in zip(Hb, P, strict=True)]
        a_shared = L * lam + sum(quads)
        _kf_step(model, opt, x, y)
        assert opt.last_innovation == pytest.approx(a_shared, rel=1e-12)
        dw = _flat_params(model) - w
        shared = np.concatenate(
            [(y - pred) / a_shared * p @ h for h, p in zip(Hb, P, strict=True)]
        )
        per_block = np.concatenate(
            [(y - pred) / (lam + q) * p @ h for h, p, q in zip(Hb, P, quads, strict=True)]
        )
        np.testing.assert_allclose(dw, shared, rtol=1e-10, atol=1e-14)
        assert not np.allclose(dw, per_block, rtol=1e-3, atol=0)


def test_linear_model_reduces_to_ridge_regression() -> None:
    """lambda = 1, one block: RLEKF is recursive least squares with prior N(w0, p0*I)."""
    d, n, p0 = 6, 40, 0.5
    rng = np.random.default_rng(3)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.1 * rng.normal(size=n)
    model = nn.Linear(d, 1, bias=False).double()
    w0 = model.weight.detach().numpy().ravel().copy()
    opt = RLEKF(model.parameters(), block_size=None, lambda0=1.0, nu=1.0, p0=p0)
    for x_i, y_i in zip(X, y, strict=True):
        x_t = torch.as_tensor(x_i)

        def closure(x_t=x_t, y_i=y_i):
            opt.zero_grad()
            pred = model(x_t).sum()
            pred.backward()
            return y_i - pred.item()

        opt.step(closure=closure)
    ridge = np.linalg.solve(X.T @ X + np.eye(d) / p0, X.T @ y + w0 / p0)
    np.testing.assert_allclose(model.weight.detach().numpy().ravel(), ridge, rtol=0, atol=1e-10)
    assert opt.lam == 1.0 and opt.n_updates == n


# --------------------------------------------------------------------------- dtype and resume
def test_float32_model_with_float64_covariance() -> None:
    model = _mlp(0, torch.float32)
    opt = RLEKF(model.parameters(), block_size=6, p_dtype="float64")
    xs, ys = _data(5)
    before = _flat_params(model)
    for x, y in zip(xs, ys, strict=True):
        _kf_step(model, opt, x, y)
    assert all(p.dtype == torch.float64 for p in opt.covariance)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert opt.state[next(model.parameters())]["P"][0].dtype == torch.float64
    assert not np.allclose(before, _flat_params(model))
    assert opt.n_updates == 5
    # The float32 run tracks the float64 one to float32 accuracy.
    model64 = _mlp(0)
    opt64 = RLEKF(model64.parameters(), block_size=6)
    for x, y in zip(xs, ys, strict=True):
        _kf_step(model64, opt64, x, y)
    np.testing.assert_allclose(_flat_params(model), _flat_params(model64), atol=1e-5)


def test_state_dict_round_trip_is_bit_exact() -> None:
    xs, ys = _data(12)
    # Uninterrupted run.
    model_a = _mlp(0, torch.float32)
    opt_a = RLEKF(model_a.parameters(), block_size=6, p_dtype=torch.float64)
    for t, (x, y) in enumerate(zip(xs, ys, strict=True)):
        _kf_step(model_a, opt_a, x, y)
        if t == 3:
            opt_a.step(error=math.nan)  # a skipped update is part of the state too
    # Interrupted run: 6 updates, checkpoint through bytes, fresh objects, 6 more updates.
    model_b = _mlp(0, torch.float32)
    opt_b = RLEKF(model_b.parameters(), block_size=6, p_dtype=torch.float64)
    for t, (x, y) in enumerate(zip(xs[:6], ys[:6], strict=True)):
        _kf_step(model_b, opt_b, x, y)
        if t == 3:
            opt_b.step(error=math.nan)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "optim": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c = _mlp(1, torch.float32)  # different init, overwritten by the checkpoint
    opt_c = RLEKF(model_c.parameters(), block_size=6, p_dtype=torch.float64)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["optim"])
    assert all(p.dtype == torch.float64 for p in opt_c.covariance)
    assert all(torch.equal(p, q) for p, q in zip(opt_b.covariance, opt_c.covariance, strict=True))
    assert opt_c.lam == opt_b.lam and opt_c.n_skipped == 1 and opt_c.n_updates == 6
    for x, y in zip(xs[6:], ys[6:], strict=True):
        _kf_step(model_c, opt_c, x, y)
    for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert p.dtype == torch.float32 and torch.equal(p, q)
    assert all(torch.equal(p, q) for p, q in zip(opt_a.covariance, opt_c.covariance, strict=True))
    assert opt_a.lam == opt_c.lam
    assert (opt_a.n_updates, opt_a.n_skipped) == (opt_c.n_updates, opt_c.n_skipped) == (12, 1)


def test_load_state_dict_before_first_step_and_aliasing() -> None:
    model = _mlp(0)
    opt = RLEKF(model.parameters(), block_size=6)
    sd = opt.state_dict()  # P not allocated yet
    opt2 = RLEKF(_mlp(0).parameters(), block_size=6)
    opt2.load_state_dict(sd)
    assert opt2.n_updates == 0 and opt2.lam == LAMBDA0
    _kf_step(model, opt, *_one_sample())
    sd = opt.state_dict()
    opt2.load_state_dict(sd)
    opt2.covariance[0].zero_()  # the loaded P must not alias the source state dict
    assert opt.covariance[0].abs().sum() > 0


def test_load_state_dict_rejects_other_block_layout() -> None:
    model = _mlp(0)
    opt = RLEKF(model.parameters(), block_size=6)
    _kf_step(model, opt, *_one_sample())
    other = RLEKF(_mlp(0).parameters(), block_size=4)
    with pytest.raises(ValueError, match=r"expected block sizes \[4, 4.*found \[6, 6, 3, 5, 6\]"):
        other.load_state_dict(opt.state_dict())
    adam = torch.optim.Adam(_mlp(0).parameters())
    with pytest.raises(ValueError, match="not an RLEKF state dict"):
        other.load_state_dict(adam.state_dict())


# --------------------------------------------------------------------------- robustness
@pytest.mark.parametrize("kind", ["nan_error", "inf_error", "nan_grad", "inf_grad", "ninf_grad"])
def test_non_finite_update_is_skipped(kind: str) -> None:
    model = _mlp(0)
    opt = RLEKF(model.parameters(), block_size=6)
    xs, ys = _data(3)
    _kf_step(model, opt, xs[0], ys[0])
    w, P, lam = _flat_params(model), [p.clone() for p in opt.covariance], opt.lam
    opt.zero_grad()
    model(torch.as_tensor(xs[1])).sum().backward()
    err = 0.3
    if kind == "nan_error":
        err = math.nan
    elif kind == "inf_error":
        err = math.inf
    else:
        bad = {"nan_grad": math.nan, "inf_grad": math.inf, "ninf_grad": -math.inf}[kind]
        model[2].weight.grad[0, 1] = bad
    opt.step(error=err)
    assert opt.n_skipped == 1 and opt.n_updates == 1
    np.testing.assert_array_equal(_flat_params(model), w)
    assert all(torch.equal(p, q) for p, q in zip(opt.covariance, P, strict=True))
    assert opt.lam == lam
    # The filter keeps working afterwards.
    _kf_step(model, opt, xs[2], ys[2])
    assert opt.n_updates == 2


def test_params_without_grad_get_zero_h() -> None:
    model = _mlp(0)
    opt = RLEKF(model.parameters(), block_size=None)
    opt.zero_grad()
    model(torch.ones(3, dtype=torch.float64)).sum().backward()
    model[2].bias.grad = None  # H = 0 for b2
    b2 = model[2].bias.detach().clone()
    opt.step(error=0.5)
    assert opt.n_updates == 1
    # P started diagonal, so K = P H is zero where H is zero.
    assert torch.equal(model[2].bias.detach(), b2)


def test_non_contiguous_parameter_matches_contiguous() -> None:
    torch.manual_seed(0)
    base = torch.randn(4, 3, dtype=torch.float64)
    x = torch.randn(4, dtype=torch.float64)
    outs = []
    params = (nn.Parameter(base.t()), nn.Parameter(base.t().contiguous()))
    assert not params[0].is_contiguous()
    for weight in params:
        opt = RLEKF([weight], block_size=5)
        for _ in range(3):
            opt.zero_grad()
            (weight @ x).sum().backward()
            opt.step(error=0.7)
        outs.append(weight.detach().clone())
    assert torch.equal(outs[0], outs[1])


# --------------------------------------------------------------------------- API
def test_step_contract_and_closure() -> None:
    model = _mlp(0)
    opt = RLEKF(model.parameters())
    x = torch.ones(3, dtype=torch.float64)

    def closure() -> torch.Tensor:
        assert torch.is_grad_enabled()
        opt.zero_grad()
        pred = model(x).sum()
        pred.backward()
        return 1.0 - pred.detach()

    ret = opt.step(closure=closure)
    assert isinstance(ret, torch.Tensor) and opt.n_updates == 1
    assert opt.step(closure) is not None and opt.n_updates == 2  # positional closure
    assert opt.step(error=torch.tensor(0.25)) == torch.tensor(0.25)
    assert opt.step(error=0.1, closure=lambda: "loss") == "loss"
    assert opt.n_updates == 4
    with pytest.raises(ValueError, match="error"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(error=torch.ones(2))
    assert math.isfinite(opt.last_innovation)


def test_lambda_schedule_and_stats() -> None:
    model = _mlp(0)
    opt = RLEKF(model.parameters(), block_size=6, p0=0.5)
    stats = opt.kalman_stats()
    assert stats["trace"] == [0.5 * n for n in opt.block_sizes]
    assert stats["min_diag"] == [0.5] * 5 and math.isnan(stats["last_innovation"])
    xs, ys = _data(10)
    for x, y in zip(xs, ys, strict=True):
        _kf_step(model, opt, x, y)
    assert opt.lam == pytest.approx(1 - (1 - LAMBDA0) * NU**10, rel=1e-14)
    stats = opt.kalman_stats()
    assert stats["n_updates"] == 10 and stats["n_skipped"] == 0 and stats["lambda"] == opt.lam
    assert stats["block_sizes"] == [6, 6, 3, 5, 6]
    for tr, p in zip(stats["trace"], opt.covariance, strict=True):
        assert tr == pytest.approx(float(p.trace()))
    assert len(stats["min_diag"]) == 5


def _lower_tile_entries(n: int, tile: int) -> int:
    """Entries (i, j) of an n x n matrix whose tile row is >= its tile column (brute force)."""
    idx = np.arange(n) // tile
    return int(np.count_nonzero(idx[:, None] >= idx[None, :]))


def test_memory_accounting() -> None:
    """P stores the tiles on and below the diagonal: about half of sum n_i**2."""
    cu = [25, 25, 625, 25, 625, 25, 20000, 50, 2500, 50, 50, 2500, 50, 50, 50, 1]
    sizes = [1350, 5120, 5120, 5120, 4640, 2650, 2651]
    tri = sum(_lower_tile_entries(n, 256) for n in sizes)
    assert RLEKF.estimate_p_bytes(cu, 5120) == 8 * tri
    assert RLEKF.estimate_p_bytes(cu, 5120, "float32") == 4 * tri
    assert tri < 0.53 * sum(n * n for n in sizes)  # one triangle + half the diagonal tiles
    assert RLEKF.estimate_p_bytes(cu, 5120, tile=1) == 8 * sum(n * (n + 1) // 2 for n in sizes)
    assert RLEKF.estimate_p_bytes(cu, None, tile=512) == 8 * _lower_tile_entries(26651, 512)
    model = _mlp(0)
    opt = RLEKF(model.parameters(), block_size=6, p_dtype="float32", tile=4)
    assert opt.p_numel == 36 * 3 + 9 + 25
    expected = 4 * sum(_lower_tile_entries(n, 4) for n in opt.block_sizes)
    assert opt.p_bytes == expected
    _kf_step(model, opt, *_one_sample())
    stored = opt.state_dict()["state"][0]["P"]
    assert sum(p.numel() * p.element_size() for p in stored) == opt.p_bytes
    assert [b.numel for b in opt.blocks] == opt.block_sizes


def test_max_p_bytes_refuses_large_covariance() -> None:
    model = nn.Linear(100, 10)  # N = 1010: GEKF needs 8 * 1010**2 bytes
    with pytest.raises(ValueError, match=r"GiB.*max_p_bytes.*smaller block_size"):
        RLEKF(model.parameters(), block_size=None, max_p_bytes=1_000_000)
    opt = RLEKF(model.parameters(), block_size=100, max_p_bytes=1_000_000)
    assert opt.p_bytes <= 1_000_000


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"block_size": 0}, "block_size"),
        ({"block_size": 2.5}, "block_size"),
        ({"lambda0": 0.0}, "lambda0"),
        ({"lambda0": 1.1}, "lambda0"),
        ({"lambda0": math.nan}, "lambda0"),
        ({"nu": 0.0}, "nu"),
        ({"nu": 1.5}, "nu"),
        ({"p0": 0.0}, "p0"),
        ({"p0": -1.0}, "p0"),
        ({"p0": math.inf}, "p0"),
        ({"p0": "1"}, "p0"),
        ({"p_dtype": torch.float16}, "p_dtype"),
        ({"p_dtype": torch.int64}, "p_dtype"),
        ({"p_dtype": "int32"}, "p_dtype"),
        ({"symmetrize_every": -1}, "symmetrize_every"),
        ({"symmetrize_every": 1.5}, "symmetrize_every"),
        ({"max_p_bytes": 0}, "max_p_bytes"),
        ({"max_p_bytes": 1.0}, "max_p_bytes"),
    ],
)
def test_argument_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RLEKF(_mlp(0).parameters(), **kwargs)


def test_one_param_group_only_and_non_empty() -> None:
    model = _mlp(0)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters()}]
    with pytest.raises(ValueError, match="exactly one parameter group"):
        RLEKF(groups)
    with pytest.raises(ValueError, match="no elements"):
        RLEKF([nn.Parameter(torch.empty(0))])


def test_p_dtype_strings_and_symmetrize_defaults() -> None:
    params = list(_mlp(0).parameters())
    assert RLEKF(params, p_dtype="float32").p_dtype == torch.float32
    assert RLEKF(params, p_dtype="torch.float64").p_dtype == torch.float64
    assert RLEKF(params).param_groups[0]["symmetrize_every"] == 100
    assert RLEKF(params, p_dtype="float32").param_groups[0]["symmetrize_every"] == 100


def test_symmetrize_every_keeps_covariance_symmetric() -> None:
    model = _mlp(0)
    opt = RLEKF(model.parameters(), block_size=None, symmetrize_every=2)
    xs, ys = _data(4)
    for x, y in zip(xs, ys, strict=True):
        _kf_step(model, opt, x, y)
    (P,) = opt.covariance
    assert torch.equal(P, P.T)
