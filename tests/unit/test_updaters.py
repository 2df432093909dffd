"""Kalman and gradient updaters: measurements as in reference §1.4–1.5, sampling, schedules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlekf.data import keys as K
from rlekf.data.dataset import GroupedBatchSampler, collate_atoms, frame_to_item
from rlekf.optim import RLEKF
from rlekf.training.updaters import GradientUpdater, KalmanUpdater, deepmd_lr
from tests.helpers import measurements as M
from tests.helpers.frames import cu_frame, model_and_batch

SMALL = {"embedding": (4, 8), "fitting": (8, 8), "axis_neuron": 4}


@pytest.fixture(scope="module")
def setup():
    frames = [cu_frame(1, rattle=0.15, seed=s) for s in range(3)]  # 4-atom cells
    model, batch = model_and_batch(frames, ["Cu"], [60], rcut=5.0, **SMALL)
    return model, batch


def _grads(model):
    return torch.cat(
        [
            (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
            for p in model.parameters()
        ]
    )


def _h_dot(h: torch.Tensor, v: torch.Tensor) -> float:
    return float(h.double() @ v.double())


def test_energy_measurement_matches_hand_reference(setup):
    """ε by hand (numpy loops) and H·v by finite differences over the weights (§1.4)."""
    model, batch = setup
    e_pred = M.predict(model, batch, forces=False)[K.ENERGY]
    batch = dict(batch)  # labels on both sides of the prediction: the sign trick matters
    batch[K.ENERGY] = e_pred + torch.tensor([0.3, -0.2, 0.05], dtype=e_pred.dtype)
    up = KalmanUpdater(energy_prefactor=1.5)
    model.zero_grad()
    eps, out = up.energy_measurement(model, batch, n=4)
    h = _grads(model)
    model.zero_grad()
    ref_eps, signs = M.energy_reference(batch[K.ENERGY], e_pred, n=4, p=1.5)
    assert signs.tolist() == [1.0, -1.0, 1.0]
    # by hand: sqrt(3) * 1.5 * (0.3 + 0.2 + 0.05) / 4 / 3
    assert ref_eps == pytest.approx(math.sqrt(3) * 1.5 * 0.55 / 12, rel=1e-9)
    assert float(eps) == pytest.approx(ref_eps, rel=1e-12)
    for v in M.random_directions(model, 3):
        fd = M.fd_directional(model, batch, lambda o: M.energy_scalar(o, signs, 4, 1.5), v, False)
        assert _h_dot(h, v) == pytest.approx(fd, rel=1e-6, abs=1e-12)


def test_force_measurement_matches_hand_reference(setup):
    """A group with a repeated atom: ε by hand and H·v by finite differences (§1.5)."""
    model, batch = setup
    up = KalmanUpdater(force_prefactor=2.0, n_select=3, group_size=3)
    atoms = torch.tensor([1, 3, 3])  # drawn with replacement: atom 3 counts twice
    model.zero_grad()
    eps, _ = up.force_measurement(model, batch, 4, atoms)
    h = _grads(model)
    model.zero_grad()
    f_pred = M.predict(model, batch, forces=True)[K.FORCES]
    ref_eps, signs = M.force_reference(batch[K.FORCES], f_pred, 4, atoms, p=2.0)
    assert float(eps) == pytest.approx(ref_eps, rel=1e-12)

    def scalar(o):
        return M.force_scalar(o, signs, 4, atoms, 2.0)

    for v in M.random_directions(model, 3, seed=1):
        fd = M.fd_directional(model, batch, scalar, v, True)
        assert _h_dot(h, v) == pytest.approx(fd, rel=1e-6, abs=1e-12)


class _RecordingOptimizer:
    """Stands in for RLEKF: records each measurement (ε, weights, H) and moves the weights.

    The move is a fixed-size step along H, so that every measurement changes the
    predictions seen by the next one.
    """

    def __init__(self, model, step_size: float = 0.3) -> None:
        self.model = model
        self.param_groups = [{"params": list(model.parameters())}]
        self.step_size = step_size
        self.records: list[tuple[float, torch.Tensor, torch.Tensor]] = []

    def zero_grad(self, set_to_none: bool = True) -> None:
        for q in self.model.parameters():
            q.grad = None

    def step(self, error=None, closure=None, grads=None) -> None:
        h = _grads(self.model)
        w = M.flat_weights(self.model)
        self.records.append((float(error), w, h))
        M.set_weights(self.model, w + self.step_size * h / h.norm())


def test_paper_mode_runs_a_fresh_forward_pass_per_measurement(setup):
    """Group j is measured at the weights left by update j - 1 (reference §1.5)."""
    model, batch = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    up = KalmanUpdater(energy_prefactor=1.0, force_prefactor=2.0, n_select=6, group_size=2)
    draws = torch.randint(4, (6,), generator=torch.Generator().manual_seed(0)).reshape(3, 2)
    calls = []
    orig_forward = model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs.get("forces", False))
        return orig_forward(*args, **kwargs)

    model.forward = counting_forward
    opt = _RecordingOptimizer(model)
    try:
        up.update(model, batch, opt)
    finally:
        del model.forward
    assert calls == [False, True, True, True]  # one energy pass, then one per force group
    assert len(opt.records) == 4
    w_start = opt.records[0][1]
    for j, (eps, w, h) in enumerate(opt.records):
        if j > 0:  # measured at the weights after the previous update, not the batch's start
            prev_eps, prev_w, prev_h = opt.records[j - 1]
            assert torch.allclose(w, prev_w + 0.3 * prev_h / prev_h.norm(), rtol=0, atol=1e-14)
        M.set_weights(model, w)
        if j == 0:
            e = M.predict(model, batch, forces=False)[K.ENERGY]
            ref, signs = M.energy_reference(batch[K.ENERGY], e, 4, 1.0)

            def scalar(o, signs=signs):
                return M.energy_scalar(o, signs, 4, 1.0)

        else:
            group = draws[j - 1]
            f = M.predict(model, batch, forces=True)[K.FORCES]
            ref, signs = M.force_reference(batch[K.FORCES], f, 4, group, 2.0)

            def scalar(o, signs=signs, group=group):
                return M.force_scalar(o, signs, 4, group, 2.0)

            # a prediction left over from the batch's starting weights would give another ε
            # (far outside the 1e-12 tolerance of the check below)
            M.set_weights(model, w_start)
            f0 = M.predict(model, batch, forces=True)[K.FORCES]
            stale, _ = M.force_reference(batch[K.FORCES], f0, 4, group, 2.0)
            assert abs(stale - ref) > 1e-6 * ref
            M.set_weights(model, w)
        assert eps == pytest.approx(ref, rel=1e-12), j
        v = M.random_directions(model, 1, seed=10 + j)[0]
        assert _h_dot(h, v) == pytest.approx(
            M.fd_directional(model, batch, scalar, v, j > 0), rel=1e-6, abs=1e-12
        ), j
    model.load_state_dict(state)


def test_update_makes_one_energy_and_n_select_over_group_force_updates(setup):
    model, batch = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = RLEKF(model.parameters(), block_size=64)
    up = KalmanUpdater(n_select=12, group_size=4, seed=3)
    up.update(model, batch, opt)
    assert opt.n_updates == 1 + 3
    assert opt.lam == pytest.approx(1 - 0.02 * 0.9987**4)
    model.load_state_dict(state)


@pytest.mark.parametrize("mode", ["paper", "fused"])
def test_energy_warm_start_makes_energy_updates_only_for_its_batches(setup, mode):
    """The first ``energy_warmup_batches`` batches: one energy update each, and the same
    weights, P and lambda as a filter driven by energy measurements alone; then the paper's
    1 + n_select/group_size updates per batch."""
    model, batch = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt = RLEKF(model.parameters(), block_size=64)
    up = KalmanUpdater(n_select=12, group_size=4, seed=3, mode=mode, energy_warmup_batches=2)
    counts = []
    for _ in range(3):
        before = opt.n_updates
        up.update(model, batch, opt)
        counts.append(opt.n_updates - before)
        if len(counts) == 2:
            warm = [p.detach().clone() for p in model.parameters()]
            warm_p = [b.clone() for b in opt.covariance]
            warm_lam = opt.lam
    assert counts == [1, 1, 4]
    assert up.n_batches == 3
    # reference: two bare energy measurements, each followed by one Kalman step (§1.4)
    model.load_state_dict(state)
    ref_opt = RLEKF(model.parameters(), block_size=64)
    ref = KalmanUpdater(seed=3)
    for _ in range(2):
        ref_opt.zero_grad(set_to_none=True)
        eps, _ = ref.energy_measurement(model, batch, n=4)
        ref_opt.step(error=eps)
    for got, want in zip(warm, model.parameters(), strict=True):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-14)
    assert warm_lam == pytest.approx(ref_opt.lam, rel=1e-15)
    for got, want in zip(warm_p, ref_opt.covariance, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    model.load_state_dict(state)


def test_energy_warm_start_counter_is_checkpointed():
    a = KalmanUpdater(energy_warmup_batches=5)
    a.n_batches = 3
    b = KalmanUpdater(energy_warmup_batches=5)
    b.load_state_dict(a.state_dict())
    assert b.n_batches == 3 and b.measures_forces is False
    b.n_batches = 5
    assert b.measures_forces is True
    old = a.state_dict()
    del old["n_batches"]  # a checkpoint written before the warm start existed
    c = KalmanUpdater()
    c.load_state_dict(old)
    assert c.n_batches == 0 and c.measures_forces is True
    with pytest.raises(ValueError, match="energy_warmup_batches"):
        KalmanUpdater(energy_warmup_batches=-1)
    with pytest.raises(ValueError, match="train_energy"):
        KalmanUpdater(energy_warmup_batches=1, train_energy=False)


def test_atom_sampling_is_seeded_and_checkpointable():
    a, b = KalmanUpdater(seed=7), KalmanUpdater(seed=7)
    draws_a = torch.randint(10, (24,), generator=a.generator)
    assert torch.equal(draws_a, torch.randint(10, (24,), generator=b.generator))
    saved = a.state_dict()
    nxt = torch.randint(10, (24,), generator=a.generator)
    c = KalmanUpdater(seed=99)
    c.load_state_dict(saved)
    assert torch.equal(nxt, torch.randint(10, (24,), generator=c.generator))


def test_kalman_refuses_frames_of_different_sizes():
    items = [
        frame_to_item(cu_frame(1), ["Cu"], 5.0, [60]),
        frame_to_item(cu_frame(2), ["Cu"], 5.0, [60]),
    ]
    model, _ = model_and_batch([cu_frame(1)], ["Cu"], [60], rcut=5.0, **SMALL)
    opt = RLEKF(model.parameters())
    with pytest.raises(ValueError, match="equal atom count"):
        KalmanUpdater().update(model, collate_atoms(items), opt)


def test_kalman_argument_validation():
    with pytest.raises(ValueError, match="multiple"):
        KalmanUpdater(n_select=10, group_size=6)
    with pytest.raises(ValueError, match="prefactors"):
        KalmanUpdater(force_prefactor=0)


def test_grouped_sampler_batches_share_atom_count_and_cover_everything():
    sizes = [4, 32, 4, 4, 32, 108, 4, 32]
    sampler = GroupedBatchSampler(sizes, batch_size=2, shuffle=True, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(sizes)))
    assert all(len({sizes[i] for i in b}) == 1 for b in batches)
    assert batches == list(sampler)  # same epoch, same order
    sampler.set_epoch(1)
    assert batches != list(sampler)


def test_deepmd_learning_rate_and_prefactor_schedule():
    assert deepmd_lr(0, 1e-3, 1e-6, 10, 1000) == pytest.approx(1e-3)
    assert deepmd_lr(1000, 1e-3, 1e-6, 10, 1000) == pytest.approx(1e-6)
    assert deepmd_lr(9, 1e-3, 1e-6, 10, 1000) == deepmd_lr(0, 1e-3, 1e-6, 10, 1000)  # staircase
    up = GradientUpdater(start_lr=1e-3, stop_lr=1e-6, stop_steps=1000, decay_steps=10)
    assert up.prefactor("f", 1e-3) == pytest.approx(1000.0)
    assert up.prefactor("f", 1e-6) == pytest.approx(1.0 + 999 * 1e-3)
    assert up.prefactor("e", 1e-3) == pytest.approx(0.02)


def test_gradient_update_skips_non_finite_loss(setup):
    model, batch = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(batch)
    bad[K.ENERGY] = batch[K.ENERGY].clone()
    bad[K.ENERGY][0] = float("nan")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    up = GradientUpdater(stop_steps=10)
    out = up.update(model, bad, opt)
    assert out.skipped == 1 and out.logs["train/lr"] == pytest.approx(1e-3)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    # the run's count of skipped steps is logged, kept in the state and resumed
    assert out.logs["train/skipped"] == 1.0
    assert up.update(model, batch, opt).logs["train/skipped"] == 1.0  # a good step adds none
    assert up.update(model, bad, opt).logs["train/skipped"] == 2.0
    resumed = GradientUpdater(stop_steps=10)
    resumed.load_state_dict(up.state_dict())
    assert resumed.n_skipped == 2
    old = {k: v for k, v in up.state_dict().items() if k != "n_skipped"}  # an older checkpoint
    resumed.load_state_dict(old)
    assert resumed.n_skipped == 0 and resumed.step_count == 3


def test_lightning_reshuffles_the_grouped_sampler_every_epoch():
    """Lightning calls set_epoch on ``batch_sampler.sampler``: the sampler must receive it."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    sampler = GroupedBatchSampler([4] * 12, batch_size=3, shuffle=True, seed=0)
    loader = DataLoader(list(range(12)), batch_sampler=sampler)
    first = list(sampler)
    _set_sampler_epoch(loader, 1)
    assert sampler.epoch == 1 and list(sampler) != first
    sampler.resume_from(2, 1)
    assert list(sampler) == GroupedBatchSampler([4] * 12, 3, seed=0)._with_epoch(2)[1:]


def test_grouped_sampler_shards_batches_across_ranks():
    sizes = [4] * 10 + [32] * 5
    full = GroupedBatchSampler(sizes, batch_size=2, shuffle=True, seed=3)
    shards = [
        GroupedBatchSampler(sizes, 2, shuffle=True, seed=3, num_replicas=2, rank=r)
        for r in range(2)
    ]
    everything = list(full)  # 5 + 3 = 8 batches
    assert [len(s) for s in shards] == [4, 4]
    got = [b for s in shards for b in s]
    assert sorted(map(tuple, got)) == sorted(map(tuple, everything))
    assert list(shards[0]) == everything[0::2] and list(shards[1]) == everything[1::2]
    odd = [GroupedBatchSampler([4] * 6, 2, seed=0, num_replicas=2, rank=r) for r in range(2)]
    assert [len(list(s)) for s in odd] == [2, 2]  # 3 batches padded to 4
    with pytest.raises(ValueError, match="rank"):
        GroupedBatchSampler(sizes, 2, num_replicas=2, rank=2)


def test_force_norm_atoms_makes_the_force_measurement_independent_of_the_cell_size():
    """A 4-atom cell and its 2x1x1 repeat: atoms 0-2 have identical environments and forces.

    With the paper's 1/n both ε and H of the same atom group halve in the bigger cell; with a
    fixed ``force_norm_atoms`` they are equal. The energy measurement (per atom) is equal in
    both forms.
    """
    from ase.build import bulk
    from ase.calculators.emt import EMT

    from rlekf.data.readers import Frame

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    atoms.positions += np.random.default_rng(3).normal(0.0, 0.12, atoms.positions.shape)
    big = atoms.repeat((2, 1, 1))
    frames = []
    for i, a in enumerate((atoms, big)):
        a.calc = EMT()
        frames.append(Frame.from_atoms(a, source="<emt>", index=i))
    model, _ = model_and_batch(frames[:1], ["Cu"], [80], rcut=5.0, **SMALL)
    batches = [collate_atoms([frame_to_item(f, ["Cu"], 5.0, [80], 0)]) for f in frames]
    group = torch.tensor([0, 1, 2])

    def measure(updater, kind):
        out = []
        for batch in batches:
            n = int(batch[K.N_ATOMS][0])
            model.zero_grad()
            if kind == "force":
                eps, _ = updater.force_measurement(model, batch, n, group)
            else:
                eps, _ = updater.energy_measurement(model, batch, n)
            out.append((float(eps), _grads(model).clone()))
        model.zero_grad()
        return out

    (e4, h4), (e8, h8) = measure(KalmanUpdater(), "force")
    assert e8 == pytest.approx(e4 / 2, rel=1e-9)
    torch.testing.assert_close(h8, h4 / 2, rtol=1e-8, atol=1e-14)
    (e4, h4), (e8, h8) = measure(KalmanUpdater(force_norm_atoms=4), "force")
    assert e8 == pytest.approx(e4, rel=1e-9)
    torch.testing.assert_close(h8, h4, rtol=1e-8, atol=1e-14)
    for up in (KalmanUpdater(), KalmanUpdater(force_norm_atoms=4)):
        (e4, h4), (e8, h8) = measure(up, "energy")
        assert e8 == pytest.approx(e4, rel=1e-9)
        torch.testing.assert_close(h8, h4, rtol=1e-8, atol=1e-14)


def test_force_norm_atoms_equal_to_n_is_the_papers_measurement(setup):
    model, batch = setup
    atoms = torch.tensor([0, 2, 3])
    res = []
    for up in (KalmanUpdater(), KalmanUpdater(force_norm_atoms=4)):
        model.zero_grad()
        eps, _ = up.force_measurement(model, batch, 4, atoms)
        res.append((float(eps), _grads(model).clone()))
    model.zero_grad()
    assert res[0][0] == res[1][0]
    assert torch.equal(res[0][1], res[1][1])
    with pytest.raises(ValueError, match="force_norm_atoms"):
        KalmanUpdater(force_norm_atoms=0)
