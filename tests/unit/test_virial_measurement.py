"""The Kalman virial pseudo-measurement: ε and H against an independent computation, masking
of frames without labels, skipping of batches without any, order in paper mode, the extra row in
fused mode, and the presets that turn it on."""

from __future__ import annotations

import math

import pytest
import torch

from rlekf.data import keys as K
from rlekf.optim import RLEKF
from rlekf.training.updaters import KalmanUpdater
from tests.helpers import measurements as M
from tests.helpers.frames import cu_frame, model_and_batch

SMALL = {"embedding": (4, 8), "fitting": (8, 8), "axis_neuron": 4}
# label - prediction per Voigt component (eV): both signs, so the sign trick matters
OFFSETS = torch.tensor([0.8, -0.5, 0.3, -0.2, 0.1, 0.4], dtype=torch.float64)


@pytest.fixture(scope="module")
def setup():
    frames = [cu_frame(1, rattle=0.15, seed=s) for s in range(3)]  # 4-atom cells
    model, batch = model_and_batch(frames, ["Cu"], [60], rcut=5.0, **SMALL)
    w_pred = M.predict_virial(model, batch)[K.VIRIAL].double()
    labels = w_pred.clone()
    for b in range(3):
        for j, (r, c) in enumerate(M.VOIGT_BY_HAND):
            shift = (1 + b) * OFFSETS[j] * (-1) ** b
            labels[b, r, c] += shift
            labels[b, c, r] = labels[b, r, c]
    batch = dict(batch)
    batch[K.VIRIAL] = labels
    return model, batch


def _masked(batch, missing=(1,)):
    """Frames in ``missing`` lose their label; the label left behind is NaN (never read)."""
    batch = dict(batch)
    has = torch.ones(batch[K.VIRIAL].shape[0], dtype=torch.bool)
    virial = batch[K.VIRIAL].clone()
    for b in missing:
        has[b] = False
        virial[b] = math.nan
    batch[K.HAS_VIRIAL], batch[K.VIRIAL] = has, virial
    return batch


def _grads(model):
    return torch.cat(
        [
            (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
            for p in model.parameters()
        ]
    )


def _flat(grads, params):
    pairs = zip(grads, params, strict=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in pairs])


def _check_h(model, batch, h, signs, p, seed):
    for v in M.random_directions(model, 2, seed=seed):
        fd = M.fd_virial_directional(model, batch, lambda o: M.virial_scalar(o, signs, 4, p), v)
        assert float(h.double() @ v.double()) == pytest.approx(fd, rel=1e-6, abs=1e-12)


def test_virial_measurement_matches_hand_reference(setup):
    """ε by hand over the 6 components of every frame, H·v by finite differences."""
    model, batch = setup
    up = KalmanUpdater(train_virial=True, virial_prefactor=1.5)
    model.zero_grad()
    eps, out = up.virial_measurement(model, batch, n=4)
    h = _grads(model)
    model.zero_grad()
    w_pred = M.predict_virial(model, batch)[K.VIRIAL]
    ref, signs = M.virial_reference(batch[K.VIRIAL], w_pred, [True] * 3, 4, 1.5)
    # by hand: sqrt(3) * 1.5 * (1 + 2 + 3) * sum|OFFSETS| / 4 / 18
    assert ref == pytest.approx(math.sqrt(3) * 1.5 * 6 * 2.3 / 4 / 18, rel=1e-9)
    assert float(eps) == pytest.approx(ref, rel=1e-12)
    assert (signs > 0).any() and (signs < 0).any()
    _check_h(model, batch, h, signs, 1.5, seed=0)


def test_frames_without_virial_are_masked_before_any_arithmetic(setup):
    """Frame 1 has no label (and a NaN where its label would be): ε and H are those of the
    other two frames, m = 2 in sqrt(m), and an RLEKF update stays finite."""
    model, batch = setup
    masked = _masked(batch)
    up = KalmanUpdater(train_virial=True, virial_prefactor=1.5)
    model.zero_grad()
    eps, _ = up.virial_measurement(model, masked, n=4)
    h = _grads(model)
    model.zero_grad()
    w_pred = M.predict_virial(model, batch)[K.VIRIAL]
    ref, signs = M.virial_reference(masked[K.VIRIAL], w_pred, masked[K.HAS_VIRIAL], 4, 1.5)
    assert ref == pytest.approx(math.sqrt(2) * 1.5 * (1 + 3) * 2.3 / 4 / 12, rel=1e-9)
    assert float(eps) == pytest.approx(ref, rel=1e-12)
    assert torch.isfinite(h).all()
    _check_h(model, batch, h, signs, 1.5, seed=1)

    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = RLEKF(model.parameters(), block_size=64)
    KalmanUpdater(train_virial=True, n_select=4, group_size=4).update(model, masked, opt)
    assert opt.n_updates == 3 and opt.n_skipped == 0
    assert all(torch.isfinite(p).all() for p in opt.covariance)
    assert all(torch.isfinite(q).all() for q in model.parameters())
    model.load_state_dict(state)


@pytest.mark.parametrize("mode", ["paper", "fused"])
def test_batch_without_virial_skips_the_measurement(setup, mode):
    """No labelled frame: the same updates, lambda and weights as without train_virial."""
    model, batch = setup
    none = _masked(batch, missing=(0, 1, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    results = []
    for train_virial in (True, False):
        model.load_state_dict(state)
        opt = RLEKF(model.parameters(), block_size=64)
        up = KalmanUpdater(train_virial=train_virial, n_select=8, group_size=4, seed=2, mode=mode)
        if train_virial:
            assert up.virial_measurement(model, none, 4) is None
        up.update(model, none, opt)
        assert up.n_virial_updates == 0
        results.append((opt.n_updates, opt.lam, [q.detach().clone() for q in model.parameters()]))
    (n_a, lam_a, w_a), (n_b, lam_b, w_b) = results
    assert n_a == n_b == 3 and lam_a == lam_b
    assert all(torch.equal(a, b) for a, b in zip(w_a, w_b, strict=True))
    model.load_state_dict(state)


class _Recorder:
    """Stands in for RLEKF: records (ε, weights, H) per measurement and moves the weights."""

    def __init__(self, model) -> None:
        self.model = model
        self.param_groups = [{"params": list(model.parameters())}]
        self.records = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for q in self.model.parameters():
            q.grad = None

    def step(self, error=None, closure=None, grads=None) -> None:
        h, w = _grads(self.model), M.flat_weights(self.model)
        self.records.append((float(error), w, h))
        M.set_weights(self.model, w + 0.3 * h / h.norm())


def test_paper_mode_measures_the_virial_first_then_energy_at_the_new_weights(setup):
    model, batch = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    up = KalmanUpdater(train_virial=True, virial_prefactor=2.0, n_select=4, group_size=4)
    calls = []
    orig = model.forward

    def counting(*args, **kwargs):
        calls.append((kwargs.get("forces", True), kwargs.get("virial", False)))
        return orig(*args, **kwargs)

    model.forward = counting
    opt = _Recorder(model)
    try:
        up.update(model, batch, opt)
    finally:
        del model.forward
    assert calls == [(False, True), (False, False), (True, False)]
    assert up.n_virial_updates == 1 and len(opt.records) == 3
    (eps_v, w0, h_v), (eps_e, w1, _) = opt.records[:2]
    M.set_weights(model, w0)
    ref, signs = M.virial_reference(
        batch[K.VIRIAL], M.predict_virial(model, batch)[K.VIRIAL], [True] * 3, 4, 2.0
    )
    assert eps_v == pytest.approx(ref, rel=1e-12)
    _check_h(model, batch, h_v, signs, 2.0, seed=2)
    # the energy measurement sees the weights after the virial update
    assert torch.allclose(w1, w0 + 0.3 * h_v / h_v.norm(), rtol=0, atol=1e-14)
    M.set_weights(model, w1)
    e1 = M.predict(model, batch, forces=False)[K.ENERGY]
    assert eps_e == pytest.approx(M.energy_reference(batch[K.ENERGY], e1, 4, 1.0)[0], rel=1e-12)
    model.load_state_dict(state)


def test_fused_mode_adds_the_virial_row(setup):
    """The fused rows: the virial row equals paper mode's measurement and the hand reference
    at the same weights (frame 1 masked); one rank-k step with one more row."""
    model, batch = setup
    masked = _masked(batch)
    params = list(model.parameters())
    up = KalmanUpdater(train_virial=True, virial_prefactor=1.5, n_select=4, group_size=2)
    groups = torch.tensor([[0, 3], [2, 2]])
    eps, grads, out = up.fused_measurements(model, masked, 4, groups, params)
    assert eps.shape == (4,) and len(grads) == 4 and K.VIRIAL in out
    model.zero_grad()
    e_v, _ = up.virial_measurement(model, masked, 4)
    assert torch.equal(eps[0], e_v)
    h0 = _flat(grads[0], params)
    assert torch.allclose(h0, _grads(model), rtol=1e-12, atol=1e-15)
    model.zero_grad()
    w_pred = M.predict_virial(model, batch)[K.VIRIAL]
    ref, signs = M.virial_reference(masked[K.VIRIAL], w_pred, masked[K.HAS_VIRIAL], 4, 1.5)
    assert float(eps[0]) == pytest.approx(ref, rel=1e-12)
    _check_h(model, batch, h0, signs, 1.5, seed=3)
    e = M.predict(model, batch, forces=False)[K.ENERGY]
    assert float(eps[1]) == pytest.approx(
        M.energy_reference(batch[K.ENERGY], e, 4, 1.0)[0], rel=1e-12
    )

    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = RLEKF(model.parameters(), block_size=64)
    rows = []
    orig = opt.step_k
    opt.step_k = lambda e, g: rows.append(len(e)) or orig(e, g)  # type: ignore[method-assign]
    fused = KalmanUpdater(train_virial=True, n_select=4, group_size=2, mode="fused")
    fused.update(model, masked, opt)
    assert rows == [4] and opt.n_updates == 4 and opt.n_skipped == 0
    assert fused.n_virial_updates == 1
    assert all(torch.isfinite(p).all() for p in opt.covariance)
    model.load_state_dict(state)


def test_state_dict_counts_virial_updates_and_reads_older_states():
    up = KalmanUpdater(train_virial=True, seed=1)
    up.n_virial_updates = 7
    other = KalmanUpdater(train_virial=True)
    other.load_state_dict(up.state_dict())
    assert other.n_virial_updates == 7
    old = {"generator": KalmanUpdater(seed=1).generator.get_state()}  # before virials
    other.load_state_dict(old)
    assert other.n_virial_updates == 0
    assert torch.equal(other.generator.get_state(), old["generator"])


def test_argument_validation():
    with pytest.raises(ValueError, match="prefactors"):
        KalmanUpdater(train_virial=True, virial_prefactor=0)
    only_virial = KalmanUpdater(train_energy=False, train_force=False, train_virial=True)
    assert only_virial.trains_virial
    with pytest.raises(ValueError, match="at least one"):
        KalmanUpdater(train_energy=False, train_force=False)


@pytest.mark.parametrize(
    ("data", "optim", "on"),
    [
        ("si_mlearn", "rlekf", False),
        ("si_mlearn", "rlekf_fused", False),
        ("mapbi3_dpgen", "rlekf_fused", True),
        ("cu_pwmat", "rlekf", False),
    ],
)
def test_presets_turn_the_virial_measurement_on(data, optim, on, tmp_path):
    from tests.helpers.hydra import compose_cfg

    cfg = compose_cfg("train", [f"data={data}", f"optim={optim}"], tmp_path)
    assert cfg.optim.updater.train_virial is on
    if data == "si_mlearn":
        # off by default since 2026-12-07 (long-run force degradation, README), one switch on
        on_ = compose_cfg(
            "train",
            [f"data={data}", f"optim={optim}", "optim.updater.train_virial=true"],
            tmp_path,
        )
        assert on_.optim.updater.train_virial is True
        # Adam has no such key: its virial weight is start/limit_pref_v
        adam = compose_cfg("train", [f"data={data}", "optim=adam"], tmp_path)
        assert "train_virial" not in adam.optim.updater
