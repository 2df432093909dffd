"""RLEKF.reset_covariance / scale_covariance (fine-tuning) against independent references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from rlekf.optim import RLEKF, ShardedRLEKF, state_covariance


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 1)).double()


def _update(model: nn.Module, opt: RLEKF, seed: int) -> None:
    """One Kalman update of ``model`` on a random sample (H = d pred / dw)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(3, generator=g, dtype=torch.float64), float(torch.randn(1, generator=g))
    opt.zero_grad()
    pred = model(x).sum()
    pred.backward()
    opt.step(error=y - float(pred.detach()))


def _trained(cls, n: int = 5):
    model = _model()
    opt = cls(model.parameters(), block_size=16, p0=0.5, lambda0=0.97, nu=0.99)
    for i in range(n):
        _update(model, opt, i)
    return model, opt


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.mark.parametrize("cls", [RLEKF, ShardedRLEKF])
def test_reset_gives_p0_identity_and_the_update_of_a_fresh_filter(cls):
    model, opt = _trained(cls)
    lam, n = opt.lam, opt.n_updates
    assert any(not torch.equal(P, 0.5 * torch.eye(P.shape[0])) for P in opt.covariance)
    opt.reset_covariance(0.25)
    for P in opt.covariance:
        assert torch.equal(P, 0.25 * torch.eye(P.shape[0], dtype=P.dtype))
    assert opt.lam == lam and opt.n_updates == n  # lambda and counters kept
    # the next update equals that of a new filter started at these weights with p0 = 0.25
    twin = copy.deepcopy(model)
    fresh = RLEKF(twin.parameters(), block_size=16, p0=0.25, lambda0=lam, nu=0.99)
    _update(model, opt, 99)
    _update(twin, fresh, 99)
    torch.testing.assert_close(_flat(model), _flat(twin), rtol=0, atol=1e-15)
    for a, b in zip(opt.covariance, fresh.covariance, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cls", [RLEKF, ShardedRLEKF])
def test_scale_multiplies_p_with_pending_factors_and_matches_an_edited_state_dict(cls):
    model, opt = _trained(cls)
    # a reference built from the saved state dict with every scale multiplied by hand
    saved = copy.deepcopy(opt.state_dict())
    before = state_covariance(saved)
    anchor = saved["state"][saved["param_groups"][0]["params"][0]]
    anchor["P_scale"] = [3.0 * c for c in anchor["P_scale"]]
    twin = copy.deepcopy(model)
    ref = cls(twin.parameters(), block_size=16, p0=0.5, lambda0=0.97, nu=0.99)
    ref.load_state_dict(saved)
    # scale a filter whose last update still has pending factors (no flush before)
    model2, opt2 = _trained(cls)
    assert any(v is not None for v in opt2._pending)
    opt2.scale_covariance(3.0)
    for b, a in zip(before, opt2.covariance, strict=True):
        torch.testing.assert_close(a, 3.0 * b, rtol=1e-14, atol=0)
    _update(model2, opt2, 42)
    _update(twin, ref, 42)
    torch.testing.assert_close(_flat(model2), _flat(twin), rtol=0, atol=1e-14)
    for a, b in zip(opt2.covariance, ref.covariance, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_scale_before_the_first_update_and_bad_factors():
    opt = RLEKF(_model().parameters(), block_size=16, p0=0.5)
    opt.scale_covariance(2.0)
    for P in opt.covariance:
        assert torch.equal(P, torch.eye(P.shape[0], dtype=P.dtype))
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="factor"):
            opt.scale_covariance(bad)
        with pytest.raises(ValueError, match="p0"):
            opt.reset_covariance(bad)
