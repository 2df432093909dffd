"""ForceFieldMetrics against numpy over several batches of frames of different sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlekf.data import keys as K
from rlekf.training.metrics import ForceFieldMetrics


def test_energy_and_force_errors_accumulate_over_batches_as_numpy_does():
    rng = np.random.default_rng(0)
    m = ForceFieldMetrics()
    e_err, f_err = [], []
    for n_frames, n in [(3, 4), (2, 9), (1, 1)]:
        n_atoms = np.full(n_frames, n)
        e_label = rng.normal(size=n_frames) * n
        e_pred = e_label + rng.normal(0.3, 1.0, size=n_frames) * n  # an offset of ~0.3 eV/atom
        f_label = rng.normal(size=(n_frames * n, 3))
        f_pred = f_label + rng.normal(size=f_label.shape)
        batch = {
            K.N_ATOMS: torch.tensor(n_atoms),
            K.ENERGY: torch.tensor(e_label),
            K.FORCES: torch.tensor(f_label),
        }
        preds = {K.ENERGY: torch.tensor(e_pred), K.FORCES: torch.tensor(f_pred)}
        m.update(preds, batch)
        e_err.append((e_pred - e_label) / n_atoms)
        f_err.append((f_pred - f_label).ravel())
    e, f = np.concatenate(e_err), np.concatenate(f_err)
    got = {k: float(v) for k, v in m.compute().items()}
    assert got["energy_rmse"] == pytest.approx(np.sqrt(np.mean(e**2)), rel=1e-12)
    assert got["energy_mae"] == pytest.approx(np.mean(np.abs(e)), rel=1e-12)
    # signed, per frame (not per atom, not per batch)
    assert got["energy_mean_error"] == pytest.approx(np.mean(e), rel=1e-12)
    assert got["energy_mean_error"] != pytest.approx(np.mean([x.mean() for x in e_err]))
    assert got["force_rmse"] == pytest.approx(np.sqrt(np.mean(f**2)), rel=1e-12)
    assert got["force_mae"] == pytest.approx(np.mean(np.abs(f)), rel=1e-12)
    m.reset()
    assert m.compute() == {}
