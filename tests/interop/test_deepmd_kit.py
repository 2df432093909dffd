"""DeePMD-kit 3.2 runs an exported rlekf model and predicts what rlekf predicts.

Models: the data presets' settings (cu_pwmat, water_deepmd, si_mlearn: rcut, sel, type map;
the default [25, 25, 25] / [50, 50, 50] / 16 network), randomly initialised (seed 0), with
descriptor statistics and energy bias computed from the first 10 real frames exactly as
``rlekf-train`` does. Each is saved as a checkpoint and exported with the CLI
(``rlekf-export --format deepmd``); DeePMD-kit then evaluates the ``.dp`` file with its numpy
reference backend (energies; it has no forces) and, after ``dp convert-backend model.dp
model.pth``, with its PyTorch backend (energy, forces, virial), on the first 3 frames. Our side
is the ASE calculator (:class:`~rlekf.calculator.DPCalculator`) and the model's virial.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlekf import keys as K
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.data.readers import read_frames
from rlekf.data.stats import energy_bias, env_statistics
from rlekf.interop.deepmd import model_def_script, to_deepmd_model
from rlekf.models import DeepPotential
from tests.interop.conftest import run, tool

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "logs" / "interop" / "deepmd_kit.json"
RTOL = 1e-8

# the presets' values (configs/data/*.yaml)
SYSTEMS = {
    "cu_pwmat": ("cu_pwmat/0_300_MOVEMENT", "pwmat/movement", ["Cu"], 6.0, [100]),
    "water": ("water_deepmd/data_0", "deepmd/npy", ["O", "H"], 6.0, [46, 92]),
    "si_mlearn": ("si_mlearn/training.extxyz", "extxyz", ["Si"], 5.0, [60]),
}


@pytest.fixture(scope="session")
def results():
    out: dict = {}
    yield out
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=1))
    print(f"\nresults written to {RESULTS}:\n{json.dumps(out, indent=1)}")


@pytest.fixture(scope="module", params=sorted(SYSTEMS))
def exported(request, shared_data, tmp_path_factory):
    """(name, frames, checkpoint, .dp, .pth, model) for one system."""
    name = request.param
    rel, fmt, type_map, rcut, sel = SYSTEMS[name]
    frames = read_frames(shared_data / rel, fmt)[:10]
    model = DeepPotential(type_map, rcut=rcut, rcut_smth=0.5, sel=sel, seed=0)
    items = [frame_to_item(f, type_map, rcut, sel, i) for i, f in enumerate(frames)]
    avg, std = env_statistics(items, len(type_map), 0.5, rcut)
    counts = np.stack([np.bincount(it[K.TYPES].numpy(), minlength=len(type_map)) for it in items])
    bias = energy_bias(np.array([f.energy for f in frames]), counts)
    model.set_statistics({"env_avg": avg, "env_std": std, "energy_bias": bias})
    tmp = tmp_path_factory.mktemp(name)
    ckpt = tmp / "model.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": dict(model.config)}, ckpt)
    run([tool("rlekf-export"), ckpt, "--format", "deepmd", "-o", tmp / "model.dp"], tmp)
    run([tool("dp"), "convert-backend", tmp / "model.dp", tmp / "model.pth"], tmp)
    return name, frames[:3], ckpt, tmp / "model.dp", tmp / "model.pth", model


def _ours(ckpt, model, frames):
    """Energy, forces (ASE calculator) and virial, atom energies (model) per frame."""
    from rlekf.calculator import DPCalculator

    calc = DPCalculator.from_checkpoint(ckpt)
    out = []
    for f in frames:
        atoms = f.to_atoms()
        atoms.calc = calc
        e, forces = atoms.get_potential_energy(), atoms.get_forces()
        batch = collate_atoms([frame_to_item(f, model.type_map, model.rcut, model.sel)])
        pred = model(batch, forces=True, virial=True)
        out.append((e, forces, pred[K.VIRIAL][0].detach().numpy(), pred[K.ATOM_ENERGY].detach()))
    return out


def _types(frame, type_map):
    from ase.data import chemical_symbols

    return np.array([type_map.index(chemical_symbols[z]) for z in frame.numbers])


def _rel(a, b):
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def test_deepmd_kit_predicts_our_energies_forces_virials(exported, results):
    from deepmd.infer import DeepPot

    name, frames, ckpt, dp_file, pth_file, model = exported
    ours = _ours(ckpt, model, frames)
    worst = {"dp_energy": 0.0, "dp_atom_energy": 0.0, "pth_energy": 0.0, "pth_forces": 0.0}
    worst["pth_virial"] = 0.0
    for backend, path in (("dp", dp_file), ("pth", pth_file)):
        pot = DeepPot(str(path))
        assert pot.get_type_map() == model.type_map
        assert pot.get_rcut() == model.rcut
        for f, (e, forces, virial, atom_e) in zip(frames, ours, strict=True):
            types = _types(f, model.type_map)
            got = pot.eval(f.positions.reshape(1, -1), f.cell.reshape(1, 9), types, atomic=True)
            worst[f"{backend}_energy"] = max(worst[f"{backend}_energy"], _rel(got[0], e))
            if backend == "dp":  # numpy backend: energies only (no autograd)
                rel = _rel(got[3].reshape(-1), atom_e.numpy())
                worst["dp_atom_energy"] = max(worst["dp_atom_energy"], rel)
                continue
            worst["pth_forces"] = max(worst["pth_forces"], _rel(got[1].reshape(-1, 3), forces))
            worst["pth_virial"] = max(worst["pth_virial"], _rel(got[2].reshape(3, 3), virial))
    results[name] = {
        "frames": len(frames),
        "atoms": [len(f.numbers) for f in frames],
        "max_relative_difference": worst,
    }
    for key, value in worst.items():
        assert value <= RTOL, f"{name}: {key} differs by {value:.3g} (relative)"


def test_file_has_deepmd_kits_own_structure(exported):
    """Same keys, settings, array shapes and dtypes as DeePMD-kit's serialization of the model
    that our ``model_def_script`` describes."""
    from deepmd.dpmodel.model.model import get_model

    model = exported[-1]
    theirs = get_model(json.loads(json.dumps(model_def_script(model)))).serialize()
    ours = to_deepmd_model(model)
    diffs: list[str] = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            if sorted(a) != sorted(b):
                diffs.append(f"{path}: keys {sorted(set(a) ^ set(b))}")
            for k in set(a) & set(b):
                walk(a[k], b[k], f"{path}/{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for i, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{i}]")
        elif isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            if not (
                isinstance(a, np.ndarray)
                and isinstance(b, np.ndarray)
                and (a.shape, a.dtype) == (b.shape, b.dtype)
            ):
                diffs.append(f"{path}: array {getattr(a, 'shape', a)} vs {getattr(b, 'shape', b)}")
        elif a != b:
            diffs.append(f"{path}: {a!r} vs {b!r}")

    walk(ours, theirs, "model")
    assert not diffs, "\n".join(diffs)


def test_dp_test_runs_and_predicts_our_energies(exported, shared_data, tmp_path, results):
    name, frames, ckpt, _, pth_file, model = exported
    if name != "water":
        pytest.skip("dp test reads deepmd/npy systems: run on the water set")
    system = shared_data / SYSTEMS[name][0]
    proc = run(
        [tool("dp"), "test", "-m", pth_file, "-s", system, "-n", 3, "-d", tmp_path / "detail"],
        tmp_path,
    )
    table = np.loadtxt(tmp_path / "detail.e.out", ndmin=2)
    ours = np.array([e for e, *_ in _ours(ckpt, model, frames)])
    np.testing.assert_allclose(table[:, 0], [f.energy for f in frames], rtol=1e-12)
    rel = _rel(table[:, 1], ours)
    results["dp_test_water"] = {"frames": 3, "max_relative_energy_difference": rel}
    assert rel <= RTOL
    assert "Energy RMSE" in proc.stdout + proc.stderr
