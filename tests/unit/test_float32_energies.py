"""float32 models on data with large absolute energies: labels, bias and sums stay float64.

PWmat Cu sits at −4968 eV/atom: a float32 frame energy of 32 such atoms is 0.016 eV coarse,
so any float32 step between the label or the bias and the per-atom error shows up at 1e-4.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rlekf import keys as K
from rlekf.data import AtomsDataModule
from rlekf.models import DeepPotential
from rlekf.training.updaters import KalmanUpdater
from tests.helpers.frames import cu_frame, model_and_batch

SMALL = {"embedding": [8, 16], "fitting": [16, 16], "axis_neuron": 4}
BIAS = -4967.8  # eV/atom, PWmat Cu


def _pair():
    """The same weights as a float64 and a float32 model (bias −4967.8 eV), and a batch."""
    frames = [cu_frame(2, seed=s) for s in range(3)]  # 3 x 32 atoms
    m64, batch = model_and_batch(frames, ["Cu"], [100], **SMALL)
    with torch.no_grad():
        m64.energy_bias.fill_(BIAS)
    m32 = DeepPotential(["Cu"], sel=[100], dtype="float32", **SMALL)
    m32.load_state_dict(m64.state_dict())
    return m64, m32, batch


def test_float32_and_float64_models_give_the_same_energy_per_atom():
    m64, m32, batch = _pair()
    assert m32.energy_bias.dtype == torch.float64 and m32.energy_bias[0].item() == BIAS
    n = batch[K.N_ATOMS].double()
    out64, out32 = m64(batch, forces=True), m32(batch, forces=True)
    assert out32[K.ENERGY].dtype == torch.float64 and out32[K.ATOM_ENERGY].dtype == torch.float64
    assert out32[K.FORCES].dtype == torch.float32
    e64 = (out64[K.ENERGY] / n).detach().numpy()
    e32 = (out32[K.ENERGY] / n).detach().numpy()
    assert np.all(np.abs(e64 - BIAS) < 50.0)  # large absolute values, as on PWmat Cu
    np.testing.assert_allclose(e32, e64, rtol=0, atol=2e-6)
    np.testing.assert_allclose(
        out32[K.ATOM_ENERGY].detach().numpy(), out64[K.ATOM_ENERGY].detach().numpy(), atol=2e-6
    )
    np.testing.assert_allclose(
        out32[K.FORCES].detach().numpy(), out64[K.FORCES].detach().numpy(), atol=1e-4
    )


def test_kalman_energy_error_of_a_float32_model_is_formed_in_float64():
    m64, m32, batch = _pair()
    n = 32
    with torch.no_grad():
        e64 = m64(batch, forces=False)[K.ENERGY].numpy()
    # labels 0.01-0.03 eV/atom away from the float64 prediction
    offsets = np.array([0.01, -0.02, 0.03]) * n
    batch = dict(batch)
    batch[K.ENERGY] = torch.as_tensor(e64 + offsets, dtype=torch.float64)
    updater = KalmanUpdater(energy_prefactor=1.0)
    eps, _ = updater.energy_measurement(m32, batch, n)
    # independent: sqrt(B) * mean |(label - prediction) / n| with the float64 prediction
    expected = math.sqrt(3) * np.mean(np.abs((batch[K.ENERGY].numpy() - e64) / n))
    assert eps.dtype == torch.float64
    assert float(eps) == pytest.approx(expected, abs=2e-6)


def test_float32_training_labels_of_pwmat_cu_are_not_rounded(shared_data, tmp_path):
    path = shared_data / "cu_pwmat" / "0_300_MOVEMENT"
    dm = AtomsDataModule(
        path=path,
        type_map=["Cu"],
        rcut=6.0,
        sel=[200],
        fmt="pwmat/movement",
        split="random",
        val_fraction=0.25,
        test_fraction=0.0,
        max_frames=4,
        use_virial=False,
        split_dir=tmp_path,
        dtype="float32",
    )
    dm.setup("fit")
    dataset = dm.datasets["train"]
    items = [dataset[i] for i in range(len(dataset))]
    assert len(items) == 3 and items[0][K.POSITIONS].dtype == torch.float32
    for item, frame in zip(items, dataset.frames, strict=True):
        n = len(frame.numbers)
        assert abs(frame.energy / n) > 4000.0  # the large absolute values the test is about
        assert frame.source.endswith("0_300_MOVEMENT")
        assert abs(float(item[K.ENERGY][0]) - frame.energy) / n <= 1e-6
        np.testing.assert_allclose(item[K.FORCES].numpy(), frame.forces, rtol=0, atol=1e-12)
