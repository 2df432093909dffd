"""Use a trained potential: rlekf-eval, DPCalculator, rlekf-export and NVE MD (rlekf-md).

One tiny RLEKF training (small model, 32-atom EMT Cu, 3 epochs, ~10 s) is shared by the tests.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from rlekf import keys as K
from rlekf.calculator import DPCalculator, UnknownElementError
from rlekf.data.dataset import collate_atoms
from rlekf.eval import evaluate
from rlekf.evaluation import read_frames_csv
from rlekf.export import export_model
from rlekf.models import DeepPotential
from rlekf.train import train
from tests.helpers.hydra import FAST_DATA, compose_cfg

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

#: NVE tolerances (32 atoms, 1 fs, 200 steps, 300 K start): the run keeps E_tot within
#: 1e-4 eV/atom of its start and drifts less than 1e-4 eV/atom/ps (observed: ~1e-5, ~1e-6).
NVE_MAX_DEVIATION = 1e-4
NVE_MAX_DRIFT = 1e-4


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(checkpoint path, datamodule, LightningModule) of a short RLEKF run on EMT Cu."""
    out = tmp_path_factory.mktemp("train_run")
    data_dir = tmp_path_factory.mktemp("use_data")
    overrides = [
        "model=small",
        "logger=none",
        "callbacks=none",
        "trainer.max_epochs=3",
        "extras.print_config=false",
        "test=false",
        *FAST_DATA,
        "data.batch_size=1",
    ]
    cfg = compose_cfg("train", overrides, out, data_dir)
    _, objects = train(cfg)
    # the final weights, saved the way rlekf-train's checkpoint callbacks save them
    ckpt = out / "checkpoints" / "final.ckpt"
    objects["trainer"].save_checkpoint(ckpt)
    return ckpt, objects["datamodule"], objects["task"], data_dir


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    return export_model(trained[0], tmp_path_factory.mktemp("export") / "cu.pt")


def test_calculator_and_export_equal_the_trained_module(trained, exported):
    ckpt, datamodule, task, _ = trained
    dataset = datamodule.datasets["test"]
    batch = collate_atoms([dataset[i] for i in range(len(dataset))])
    ref = task.model(batch, forces=True)
    from_ckpt = DPCalculator.from_checkpoint(ckpt)
    from_file = DPCalculator.from_file(exported)
    start = 0
    for b, frame in enumerate(dataset.frames):
        n = frame.n_atoms
        forces = ref[K.FORCES][start : start + n].detach().numpy()
        energy = float(ref[K.ENERGY][b].detach())
        for calc in (from_ckpt, from_file):
            atoms = frame.to_atoms()
            atoms.calc = calc
            assert atoms.get_potential_energy() == pytest.approx(energy, abs=1e-10)
            np.testing.assert_allclose(atoms.get_forces(), forces, rtol=0, atol=1e-10)
        atoms = frame.to_atoms()
        atoms.calc = from_ckpt
        stress = atoms.get_stress()
        atoms.calc = from_file
        np.testing.assert_allclose(atoms.get_stress(), stress, rtol=0, atol=1e-12)
        start += n


def test_training_checkpoint_loads_with_weights_only(trained):
    # everything rlekf-train writes rebuilds without full unpickling (no code from the file)
    ckpt = torch.load(trained[0], map_location="cpu", weights_only=True)
    assert {"state_dict", "model_config", "optimizer_states", "rng_states"} <= set(ckpt)


def test_nve_conserves_energy(trained, exported, tmp_path):
    from ase.io import read

    from rlekf.md import cu_supercell, load_calculator, run_nve

    atoms = cu_supercell(size=2)  # 32 atoms
    traj = tmp_path / "nve.extxyz"
    res = run_nve(
        atoms,
        load_calculator(exported),
        steps=200,
        timestep_fs=1.0,
        temperature_K=300.0,
        seed=0,
        interval=5,
        trajectory=traj,
    )
    assert res.temperature[0] > 200.0
    assert res.max_deviation < NVE_MAX_DEVIATION, res.max_deviation
    assert abs(res.drift) < NVE_MAX_DRIFT, res.drift
    frames = read(traj, index=":")
    assert len(frames) == 41
    assert frames[-1].get_potential_energy() == pytest.approx(res.epot[-1])


def test_cli_export_and_md(trained, tmp_path, capsys):
    from rlekf.export import main as export_main
    from rlekf.md import main as md_main

    out = tmp_path / "m.pt"
    assert export_main([str(trained[0]), "-o", str(out)]) == 0
    assert out.exists()
    traj = tmp_path / "md.extxyz"
    rc = md_main(
        [str(out), "--size", "2", "--steps", "20", "--no-progress", "--traj", str(traj)]
        + ["--interval", "5"]
    )
    assert rc == 0
    from ase.io import read

    assert len(read(traj, index=":")) == 5
    assert "energy drift" in capsys.readouterr().out


def test_eval_on_dft_data_writes_png_and_csv(shared_data, trained, tmp_path, capsys):
    overrides = [
        f"ckpt_path={trained[0]}",
        "data=cu_pwmat",
        "split=all",
        "data.max_frames=6",
        "data.val_path=null",
        "progress=false",
    ]
    cfg = compose_cfg("eval", overrides, tmp_path)
    metrics = evaluate(cfg)
    printed = capsys.readouterr().out
    assert (tmp_path / "parity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    frames = read_frames_csv(tmp_path / "predictions_frames.csv")
    assert len(frames["frame_id"]) == 6 and set(frames["n_atoms"]) == {72.0}
    e_rmse = float(
        np.sqrt(np.mean((frames["energy_per_atom_pred"] - frames["energy_per_atom_dft"]) ** 2))
    )
    atoms = np.genfromtxt(
        tmp_path / "predictions_atoms.csv", delimiter=",", names=True, dtype=None, encoding=None
    )
    f_err = np.stack([atoms[f"f{c}_pred"] - atoms[f"f{c}_dft"] for c in "xyz"], axis=1)
    f_rmse = float(np.sqrt(np.mean(f_err**2)))
    shown_e = float(re.search(r"energy RMSE: (\S+) eV/atom", printed).group(1))
    shown_f = float(re.search(r"force RMSE:  (\S+) eV/Å", printed).group(1))
    assert shown_e == pytest.approx(e_rmse, rel=1e-5)
    assert shown_f == pytest.approx(f_rmse, rel=1e-5)
    assert metrics["energy_rmse"] == pytest.approx(e_rmse, rel=1e-12)
    assert metrics["force_rmse/Cu"] == pytest.approx(f_rmse, rel=1e-12)
    assert e_rmse > 1000.0  # PWmat Cu is ~-4968 eV/atom, EMT ~0: consistency, not accuracy


def test_eval_default_test_split_matches_the_module(trained, tmp_path):
    ckpt, datamodule, task, data_dir = trained
    cfg = compose_cfg(
        "eval", [f"ckpt_path={ckpt}", "progress=false", *FAST_DATA], tmp_path, data_dir
    )
    metrics = evaluate(cfg)
    dataset = datamodule.datasets["test"]
    batch = collate_atoms([dataset[i] for i in range(len(dataset))])
    pred = task.model(batch, forces=True)
    f_rmse = torch.sqrt(torch.mean((pred[K.FORCES] - batch[K.FORCES]) ** 2)).item()
    assert metrics["n_frames"] == len(dataset)
    assert metrics["force_rmse"] == pytest.approx(f_rmse, rel=1e-10)


def test_bad_inputs_give_clear_errors(trained, tmp_path):
    ckpt, _, _, data_dir = trained
    # a checkpoint of another model whose type map lacks Cu
    model = DeepPotential(["Ag"], sel=[100], embedding=[8, 16], fitting=[16, 16], axis_neuron=4)
    model.set_statistics(
        {"env_avg": np.zeros((1, 4)), "env_std": np.ones((1, 4)), "energy_bias": [0.0]}
    )
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": model.config}, tmp_path / "ag.ckpt")
    cfg = compose_cfg(
        "eval", [f"ckpt_path={tmp_path / 'ag.ckpt'}", *FAST_DATA], tmp_path / "ev", data_dir
    )
    with pytest.raises(ValueError, match=r"trained for elements \['Ag'\].*element Cu"):
        evaluate(cfg)
    # an element the trained Cu model has not seen
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.symbols[0] = "Zn"
    atoms.calc = DPCalculator.from_checkpoint(ckpt)
    with pytest.raises(UnknownElementError, match=r"Zn.*\['Cu'\]"):
        atoms.get_forces()
    # an unknown split
    cfg = compose_cfg(
        "eval", [f"ckpt_path={ckpt}", "split=bogus", *FAST_DATA], tmp_path / "e2", data_dir
    )
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate(cfg)


def test_eval_group_by_reports_each_frame_group(trained, tmp_path, capsys):
    import json

    from ase.io import write

    from tests.helpers.frames import cu_frame

    frames = []
    for i, g in enumerate(["hot", "cold", "hot"]):
        atoms = cu_frame(2, rattle=0.05 + 0.1 * (g == "hot"), seed=i).to_atoms()
        atoms.info["group"] = g
        frames.append(atoms)
    path = tmp_path / "grouped.extxyz"
    write(path, frames, format="extxyz")
    overrides = [
        f"ckpt_path={trained[0]}",
        "data=xyz",
        f"data.path={path}",
        "data.fmt=extxyz",
        "split=all",
        "group_by=group",
        "progress=false",
    ]
    metrics = evaluate(compose_cfg("eval", overrides, tmp_path / "ev"))
    groups = json.loads((tmp_path / "ev" / "metrics_by_group.json").read_text())
    assert sorted(groups) == ["cold", "hot"]
    assert (groups["hot"]["n_frames"], groups["cold"]["n_frames"]) == (2, 1)
    frame_csv = read_frames_csv(tmp_path / "ev" / "predictions_frames.csv")
    err = frame_csv["energy_per_atom_pred"] - frame_csv["energy_per_atom_dft"]
    hot = np.array([0, 2])  # frames are evaluated in file order here
    assert groups["hot"]["energy_mae"] == pytest.approx(np.mean(np.abs(err[hot])), rel=1e-12)
    assert groups["cold"]["energy_mae"] == pytest.approx(abs(err[1]), rel=1e-12)
    assert metrics["energy_mean_error"] == pytest.approx(np.mean(err), rel=1e-12)
    assert "| hot | 2 |" in capsys.readouterr().out
