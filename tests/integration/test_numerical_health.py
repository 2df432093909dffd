"""Non-finite labels never reach P or the weights; too many skips stop with a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from rlekf.data.dataset import AtomsDataset, GroupedBatchSampler, collate_atoms
from rlekf.models import DeepPotential
from rlekf.optim import RLEKF
from rlekf.training import ForceFieldModule, KalmanUpdater
from tests.helpers.frames import cu_frame
from tests.helpers.trainer import bare_trainer


def _loader(n_frames: int, poison: bool) -> DataLoader:
    frames = [cu_frame(1, seed=s) for s in range(n_frames)]
    if poison:
        for f in frames:
            f.energy = float("nan")
            f.forces[:] = np.inf
    ds = AtomsDataset(frames, ["Cu"], 5.0, [60])
    return DataLoader(
        ds,
        batch_sampler=GroupedBatchSampler(ds.n_atoms, 1, shuffle=False),
        collate_fn=collate_atoms,
    )


def _fit(max_skips: int):
    model = DeepPotential(
        ["Cu"], rcut=5.0, sel=[60], embedding=(4, 8), fitting=(8,), axis_neuron=4, seed=0
    )
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    task = ForceFieldModule(
        model, lambda p: RLEKF(p, block_size=64), KalmanUpdater(), max_consecutive_skips=max_skips
    )
    trainer = bare_trainer()
    return trainer, task, initial


def test_non_finite_labels_never_touch_weights_or_p():
    trainer, task, initial = _fit(max_skips=100)
    trainer.fit(task, train_dataloaders=_loader(4, poison=True))
    opt = trainer.optimizers[0]
    assert opt.n_updates == 0 and opt.n_skipped == 4 * 5
    assert opt.lam == pytest.approx(0.98)
    for k, v in task.model.state_dict().items():
        assert torch.equal(v, initial[k]), k
    for p in opt.covariance:
        assert torch.equal(p, torch.eye(p.shape[0], dtype=p.dtype))


def test_consecutive_skips_stop_with_a_clear_message():
    trainer, task, _ = _fit(max_skips=3)
    with pytest.raises(RuntimeError, match="3 consecutive batches had non-finite"):
        trainer.fit(task, train_dataloaders=_loader(5, poison=True))
