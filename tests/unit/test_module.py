"""Pure helpers of the LightningModule."""

from __future__ import annotations

from types import SimpleNamespace

from rlekf.data.dataset import GroupedBatchSampler
from rlekf.training.callbacks import _rescale_position


def _order(world: int, rank: int, n_frames: int = 40) -> list[list[int]]:
    s = GroupedBatchSampler(
        [8] * n_frames, batch_size=2, shuffle=False, num_replicas=world, rank=rank
    )
    return list(s)


def test_rescaled_position_skips_exactly_the_batches_trained_before():
    # 2 ranks trained 3 batches each = the first 6 batches of the epoch's order
    epoch, done = _rescale_position((4, 3), 2, SimpleNamespace(world_size=1))
    assert (epoch, done) == (4, 6)
    trained = [b for r in range(2) for b in _order(2, r)[:3]]
    assert sorted(map(tuple, trained)) == sorted(map(tuple, _order(1, 0)[:done]))
    # 1 rank -> 3 ranks: 6 batches done = 2 per rank
    assert _rescale_position((0, 6), 1, SimpleNamespace(world_size=3)) == (0, 2)
    # same world size or nothing done: unchanged
    assert _rescale_position((2, 5), 2, SimpleNamespace(world_size=2)) == (2, 5)
    # not divisible: round down (the remainder is trained again)
    assert _rescale_position((0, 5), 1, SimpleNamespace(world_size=2)) == (0, 2)


def _fit_tiny(optimizer, updater, **kw):
    from torch.utils.data import DataLoader

    from rlekf.data.dataset import AtomsDataset, collate_atoms
    from rlekf.models import DeepPotential
    from rlekf.training import ForceFieldModule
    from tests.helpers.frames import cu_frame
    from tests.helpers.trainer import bare_trainer

    ds = AtomsDataset([cu_frame(1, seed=s) for s in range(2)], ["Cu"], 5.0, [60])
    loader = DataLoader(
        ds,
        batch_sampler=GroupedBatchSampler(ds.n_atoms, 1, shuffle=False),
        collate_fn=collate_atoms,
    )
    model = DeepPotential(
        ["Cu"], rcut=5.0, sel=[60], embedding=(4, 8), fitting=(8,), axis_neuron=4, seed=0
    )
    task = ForceFieldModule(model, optimizer, updater, **kw)
    trainer = bare_trainer()
    trainer.fit(task, train_dataloaders=loader)
    return trainer


def test_kalman_state_and_gradient_losses_are_logged_under_their_names():
    """``kf/*`` (KalmanMonitor, added by the module) and ``train/loss``/``train/lr``."""
    import functools

    import pytest
    import torch

    from rlekf.training import GradientUpdater, KalmanUpdater
    from rlekf.training.optimizers import kalman_filter

    opt = functools.partial(kalman_filter, block_size=64)
    trainer = _fit_tiny(opt, KalmanUpdater(n_select=4, group_size=2), log_p_every=1)
    m, kf = trainer.logged_metrics, trainer.optimizers[0]
    assert float(m["kf/updates"]) == kf.n_updates == 2 * 3
    f32 = functools.partial(pytest.approx, rel=1e-6)  # logged as float32
    assert float(m["kf/lambda"]) == f32(kf.lam)
    assert float(m["kf/skipped"]) == kf.n_skipped == 0
    assert float(m["kf/indefinite"]) == kf.n_indefinite
    blocks = kf.kalman_stats()
    for i, (tr, md) in enumerate(zip(blocks["trace"], blocks["min_diag"], strict=True)):
        assert float(m[f"kf/P{i}_trace"]) == f32(float(tr))
        assert float(m[f"kf/P{i}_min_diag"]) == f32(float(md))
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    trainer = _fit_tiny(adam, GradientUpdater(stop_steps=2))
    m = trainer.logged_metrics
    assert {"train/loss_step", "train/loss_epoch", "train/lr"} <= set(m)
    assert not any(k.startswith("kf/") for k in m)


def test_kalman_filter_chooses_the_sharded_class_only_when_asked_or_data_parallel():
    import pytest
    import torch

    from rlekf.optim import RLEKF, ShardedRLEKF
    from rlekf.training.optimizers import kalman_filter

    params = [torch.nn.Parameter(torch.zeros(8))]
    assert type(kalman_filter(params, block_size=4)) is RLEKF  # no process group: one process
    sharded = kalman_filter(params, sharded=True, block_size=4)
    assert isinstance(sharded, ShardedRLEKF) and sharded.world_size == 1
    assert type(kalman_filter(params, sharded=False, block_size=4)) is RLEKF
    with pytest.raises(ValueError, match="sharded must be"):
        kalman_filter(params, sharded="yes", block_size=4)
