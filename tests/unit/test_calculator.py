"""DPCalculator and the TorchScript export on small untrained models (no training needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.fd import calculate_numerical_forces, calculate_numerical_stress

from rlekf import keys as K
from rlekf.calculator import DPCalculator, UnknownElementError
from rlekf.data.neighbors import NeighborOverflowError
from rlekf.export import FORMAT_VERSION, META_FILE, export_model, load_checkpoint, load_exported
from rlekf.models import DeepPotential
from tests.helpers.frames import cu_frame, model_and_batch, water_like_frame

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

SMALL = {"embedding": [8, 16], "fitting": [16, 16], "axis_neuron": 4}


def _cu_model():
    frames = [cu_frame(2, seed=s) for s in range(2)]
    model, batch = model_and_batch(frames, ["Cu"], [100], **SMALL)
    with torch.no_grad():
        model.energy_bias.fill_(-3.5)
    return model, batch, frames


def _calc(model: DeepPotential) -> DPCalculator:
    return DPCalculator(model, type_map=model.type_map, rcut=model.rcut, sel=model.sel)


def _save_ckpt(model: DeepPotential, path):
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": dict(model.config)}, path)
    return path


def test_calculator_matches_model_on_the_same_frames():
    model, batch, frames = _cu_model()
    ref = model(batch, forces=True, virial=True)
    calc = _calc(model)
    start = 0
    for b, frame in enumerate(frames):
        atoms = frame.to_atoms()
        atoms.calc = calc
        n = frame.n_atoms
        assert atoms.get_potential_energy() == pytest.approx(
            float(ref[K.ENERGY][b].detach()), abs=1e-10
        )
        np.testing.assert_allclose(
            atoms.get_forces(), ref[K.FORCES][start : start + n].detach().numpy(), atol=1e-10
        )
        virial = ref[K.VIRIAL][b].detach().numpy()
        stress = -0.5 * (virial + virial.T) / atoms.get_volume()
        np.testing.assert_allclose(atoms.get_stress(voigt=False), stress, atol=1e-12)
        assert atoms.get_potential_energies().sum() == pytest.approx(
            atoms.get_potential_energy(), abs=1e-9
        )
        start += n


def test_forces_and_stress_equal_finite_differences():
    model, _, frames = _cu_model()
    atoms = frames[0].to_atoms()
    atoms.set_cell(atoms.cell @ np.array([[1.0, 0.03, 0.0], [0.0, 1.0, 0.02], [0.0, 0.0, 1.0]]))
    atoms.calc = _calc(model)
    numeric = calculate_numerical_forces(atoms, eps=1e-4)
    np.testing.assert_allclose(atoms.get_forces(), numeric, atol=1e-6)
    numeric_stress = calculate_numerical_stress(atoms, eps=1e-5)
    np.testing.assert_allclose(atoms.get_stress(), numeric_stress, atol=1e-7)


def test_non_periodic_molecule_has_forces_but_no_stress():
    from ase.cluster import Icosahedron

    model, _, _ = _cu_model()
    atoms = Icosahedron("Cu", 2)  # 13 atoms, no cell, no pbc
    atoms.rattle(0.05, seed=1)
    atoms.calc = _calc(model)
    energy = atoms.get_potential_energy()
    assert np.isfinite(energy)
    numeric = calculate_numerical_forces(atoms, eps=1e-4)
    np.testing.assert_allclose(atoms.get_forces(), numeric, atol=1e-6)
    np.testing.assert_allclose(atoms.get_forces().sum(0), 0.0, atol=1e-10)
    with pytest.raises(PropertyNotImplementedError):
        atoms.get_stress()
    # translated far away: same energy (no hidden dependence on the zero cell)
    moved = atoms.copy()
    moved.positions += 100.0
    moved.calc = _calc(model)
    assert moved.get_potential_energy() == pytest.approx(energy, abs=1e-9)


def test_unknown_element_and_neighbour_overflow_are_clear_errors():
    model, _, frames = _cu_model()
    atoms = frames[0].to_atoms()
    atoms.symbols[3] = "Au"
    atoms.calc = _calc(model)
    with pytest.raises(UnknownElementError, match=r"Au.*type map \['Cu'\]"):
        atoms.get_potential_energy()
    tight = DPCalculator(model, type_map=["Cu"], rcut=model.rcut, sel=[10])
    atoms = frames[0].to_atoms()
    atoms.calc = tight
    with pytest.raises(NeighborOverflowError, match=r"sel\[0\]=10.*larger sel"):
        atoms.get_potential_energy()


@pytest.mark.parametrize("type_one_side", [False, True])
def test_export_equals_model_two_elements(type_one_side, tmp_path):
    frames = [water_like_frame(0), water_like_frame(1)]
    model = DeepPotential(["H", "O"], sel=[80, 40], type_one_side=type_one_side, seed=1, **SMALL)
    _, batch = model_and_batch(frames, ["H", "O"], [80, 40], **SMALL)
    model.set_statistics(
        {"env_avg": torch.rand(2, 4) * 0.1, "env_std": 1 + torch.rand(2, 4), "energy_bias": [1, 2]}
    )
    path = export_model(model, tmp_path / "water.pt")
    module, meta = load_exported(path)
    assert meta["type_map"] == ["H", "O"] and meta["sel"] == [80, 40]
    assert module.type_map == ["H", "O"] and meta["format_version"] == FORMAT_VERSION
    assert isinstance(module, torch.jit.ScriptModule)  # the model itself, scripted
    ref = model(batch, forces=True, virial=True)
    out = module(batch, forces=True, virial=True)
    for key in (K.ENERGY, K.ATOM_ENERGY, K.FORCES, K.VIRIAL):
        torch.testing.assert_close(out[key], ref[key].detach(), atol=1e-10, rtol=0)
    # the ASE calculator gives the same numbers from the file and from the model
    atoms = frames[0].to_atoms()
    atoms.calc = DPCalculator.from_file(path)
    e_file, f_file = atoms.get_potential_energy(), atoms.get_forces()
    s_file = atoms.get_stress()
    atoms.calc = _calc(model)
    assert e_file == pytest.approx(atoms.get_potential_energy(), abs=1e-10)
    np.testing.assert_allclose(f_file, atoms.get_forces(), atol=1e-10)
    np.testing.assert_allclose(s_file, atoms.get_stress(), atol=1e-12)


def test_exported_file_loads_with_plain_torch(tmp_path):
    model, batch, _ = _cu_model()
    path = export_model(_save_ckpt(model, tmp_path / "m.ckpt"), tmp_path / "m.pt")
    extra = {META_FILE: ""}
    module = torch.jit.load(str(path), _extra_files=extra)  # no rlekf involved
    assert json.loads(extra[META_FILE])["rcut"] == model.rcut
    inputs = {k: batch[k] for k in ("positions", "cell", "types", "batch", "neighbors", "shifts")}
    out = module(inputs, True, True)  # as the export module's docstring shows
    ref = model(batch, forces=True, virial=True)
    for key in ("energy", "forces", "virial"):
        torch.testing.assert_close(out[key], ref[key].detach(), atol=1e-10, rtol=0)
    assert set(module(inputs, False, False)) == {"energy", K.ATOM_ENERGY}


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    model, batch, _ = _cu_model()
    ckpt = _save_ckpt(model, tmp_path / "good.ckpt")
    loaded, config = load_checkpoint(ckpt)
    assert config["type_map"] == ["Cu"]
    torch.testing.assert_close(loaded(batch)[K.ENERGY], model(batch)[K.ENERGY], atol=0, rtol=0)

    torch.save({"state_dict": {}, "epoch": 1}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not an rlekf training checkpoint"):
        DPCalculator.from_checkpoint(tmp_path / "other.ckpt")

    bad = torch.load(ckpt, weights_only=True)
    bad["model_config"]["embedding"] = [8, 32]
    torch.save(bad, tmp_path / "mismatch.ckpt")
    with pytest.raises(ValueError, match="weights do not match"):
        load_checkpoint(tmp_path / "mismatch.ckpt")

    with pytest.raises(ValueError, match="not a TorchScript file written by rlekf-export"):
        DPCalculator.from_file(ckpt)

    path = export_model(model, tmp_path / "m.pt")
    extra = {META_FILE: ""}
    module = torch.jit.load(str(path), _extra_files=extra)
    meta = json.loads(extra[META_FILE])
    meta["format_version"] = 999
    torch.jit.save(module, str(tmp_path / "v999.pt"), _extra_files={META_FILE: json.dumps(meta)})
    with pytest.raises(ValueError, match="format version 999.*re-export"):
        DPCalculator.from_file(tmp_path / "v999.pt")
    torch.jit.save(module, str(tmp_path / "nometa.pt"))
    with pytest.raises(ValueError, match="without rlekf metadata"):
        load_exported(tmp_path / "nometa.pt")


def test_calculator_handles_any_atom_count_and_mixed_pbc():
    from ase.build import fcc111

    model, _, _ = _cu_model()
    calc = _calc(model)
    single = Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    single.calc = calc
    in_box = Atoms("Cu", positions=[[0.0, 0.0, 0.0]], cell=[30.0] * 3, pbc=True)
    in_box.calc = _calc(model)
    assert single.get_potential_energy() == pytest.approx(in_box.get_potential_energy(), abs=1e-12)
    np.testing.assert_allclose(single.get_forces(), 0.0, atol=1e-12)
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=5.0)  # periodic in x and y only
    slab.rattle(0.05, seed=2)
    slab.calc = calc
    numeric = calculate_numerical_forces(slab, eps=1e-4)
    np.testing.assert_allclose(slab.get_forces(), numeric, atol=1e-6)
    with pytest.raises(PropertyNotImplementedError):
        slab.get_stress()
