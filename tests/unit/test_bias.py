"""Energy-bias refit (change-bias): rlekf.finetune against hand-written least squares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlekf.data.readers import Frame
from rlekf.finetune import fit_bias_correction, refit_energy_bias


def _normal_equations(a: np.ndarray, r: np.ndarray) -> np.ndarray:
    """The full-rank least-squares solution (A^T A) d = A^T r, solved by hand (no lstsq)."""
    return np.linalg.solve(a.T @ a, a.T @ r)


def test_fit_equals_the_normal_equations():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=(30, 3))
    true = np.array([-3.5, -1.2, 0.7])
    residual = counts @ true + rng.normal(0, 0.05, size=30)
    got = fit_bias_correction(counts, residual)
    np.testing.assert_allclose(got, _normal_equations(counts.astype(float), residual), rtol=1e-10)
    assert np.abs(got - true).max() < 0.05  # and it recovers the generating shifts


def test_absent_elements_keep_their_bias():
    rng = np.random.default_rng(1)
    counts = rng.integers(1, 20, size=(12, 4))
    counts[:, 2] = 0  # element 2 never appears
    residual = rng.normal(size=12)
    got = fit_bias_correction(counts, residual)
    assert got[2] == 0.0
    present = [0, 1, 3]
    ref = _normal_equations(counts[:, present].astype(float), residual)
    np.testing.assert_allclose(got[present], ref, rtol=1e-10)


def test_collinear_compositions_give_the_minimum_norm_solution():
    # every frame is (H2O)_k: only 2 d_H + d_O is determined; the minimum-norm solution is
    # d = s v / |v|^2 with v = (2, 1) and s = sum_f k_f r_f / sum_f k_f^2 (hand derivation)
    k = np.array([1.0, 2.0, 3.0, 5.0])
    v = np.array([2.0, 1.0])
    counts = (k[:, None] * v).astype(np.int64)
    residual = np.array([0.3, 0.5, 1.1, 1.4])
    s = (k @ residual) / (k @ k)
    np.testing.assert_allclose(fit_bias_correction(counts, residual), s * v / (v @ v), rtol=1e-10)


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="counts must be"):
        fit_bias_correction(np.ones((3, 2)), np.ones(4))
    with pytest.raises(ValueError, match="no frames"):
        fit_bias_correction(np.zeros((0, 2)), np.zeros(0))
    with pytest.raises(ValueError, match="frame\\(s\\) \\[1\\]"):
        fit_bias_correction(np.ones((3, 2)), np.array([0.0, np.nan, 1.0]))


def _frames() -> list[Frame]:
    """EMT-labelled 32-atom fcc cells of Cu and Au (no Ag), of several compositions."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    out = []
    for i, n_au in enumerate([0, 3, 8, 16, 5]):
        atoms = bulk("Cu", "fcc", a=3.7, cubic=True).repeat(2)
        atoms.symbols[:n_au] = "Au"
        atoms.rattle(0.05, seed=i)
        atoms.calc = EMT()
        out.append(
            Frame(
                positions=atoms.positions,
                cell=np.array(atoms.cell),
                pbc=atoms.pbc,
                numbers=atoms.numbers,
                energy=float(atoms.get_potential_energy()),
                forces=atoms.get_forces(),
                source="emt",
                index=i,
            )
        )
    return out


def test_refit_on_frames_adds_the_hand_fit_and_shifts_energies_by_counts():
    from rlekf.models import DeepPotential

    model = DeepPotential(
        ["Cu", "Au", "Ag"],
        rcut=4.0,
        sel=[30, 30, 30],
        embedding=[4, 8],
        fitting=[8],
        axis_neuron=2,
        seed=0,
    )
    old = np.array([-3.0, -2.0, -1.5])
    model.set_statistics(
        {"env_avg": np.zeros((3, 4)), "env_std": np.full((3, 4), 0.3), "energy_bias": old}
    )
    frames = _frames()
    first = refit_energy_bias(model, frames, apply=False)  # predictions with the old bias
    counts = np.array([[np.sum(f.numbers == z) for z in (29, 79, 47)] for f in frames])
    labels = np.array([f.energy for f in frames])
    # the model's energies, independently of refit_energy_bias: a plain forward pass
    from rlekf.data.dataset import AtomsDataset, collate_atoms

    ds = AtomsDataset(frames, model.type_map, model.rcut, model.sel)
    batch = collate_atoms([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        pred_before = model(batch, forces=False)["energy"].numpy().copy()
    delta = np.zeros(3)
    delta[:2] = _normal_equations(counts[:, :2].astype(float), labels - pred_before)
    np.testing.assert_allclose(first.new_bias, old + delta, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(model.energy_bias.numpy(), old)  # apply=False: unchanged

    change = refit_energy_bias(model, ds)
    assert change.new_bias[2] == old[2] and change.atoms_per_type[2] == 0  # Ag kept
    np.testing.assert_allclose(model.energy_bias.numpy(), old + delta, rtol=0, atol=1e-9)
    with torch.no_grad():
        pred_after = model(batch, forces=False)["energy"].numpy()
    np.testing.assert_allclose(pred_after - pred_before, counts @ delta, rtol=0, atol=1e-9)
    assert change.energy_rmse_after < change.energy_rmse_before
    assert "Ag" in change.summary() and "kept" in change.summary()


def test_change_bias_command_line_translation():
    from rlekf.change_bias import _translate, default_output

    assert _translate(["a.ckpt", "data=xyz", "-o", "b.ckpt", "--trust-checkpoint"]) == [
        "ckpt_path=a.ckpt",
        "data=xyz",
        "output=b.ckpt",
        "trust_checkpoint=true",
    ]
    assert _translate(["ckpt_path=a.ckpt", "--output=c.ckpt"]) == [
        "ckpt_path=a.ckpt",
        "output=c.ckpt",
    ]
    assert _translate(["--help"]) == ["--help"]
    with pytest.raises(SystemExit, match="-o needs a file name"):
        _translate(["a.ckpt", "-o"])
    from pathlib import Path

    assert default_output(Path("runs/last.ckpt")) == Path("runs/last_bias.ckpt")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("forget", None, None), "covariance must be one of"),
        (("inflate", None, None), "inflate needs finetune.inflate > 0"),
        (("inflate", -2.0, None), "inflate needs finetune.inflate > 0"),
        (("keep", 2.0, None), "only used with finetune.covariance=inflate"),
        (("keep", None, 1.5), "lambda0 must be in"),
        (("keep", None, None, "fit"), "bias must be keep or refit"),
    ],
)
def test_finetune_options_are_checked(options, message):
    from rlekf.finetune import validate_finetune_options

    with pytest.raises(ValueError, match=message):
        validate_finetune_options(*options)
    validate_finetune_options("inflate", 3.0, 0.99, "refit")  # a valid set passes


def test_refit_refuses_a_data_set_of_another_type_map():
    from rlekf.data.dataset import AtomsDataset
    from rlekf.models import DeepPotential

    model = DeepPotential(
        ["Cu", "Au"], rcut=4.0, sel=[30, 30], embedding=[4, 8], fitting=[8], axis_neuron=2, seed=0
    )
    ds = AtomsDataset(_frames()[:2], ["Au", "Cu"], model.rcut, model.sel)
    with pytest.raises(ValueError, match="another type map"):
        refit_energy_bias(model, ds)
