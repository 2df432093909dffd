"""``rlekf-devi``: model_devi.out of a committee against a hand computation, the Kalman source,
calibration through the CLI, and the exit codes on bad input."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ase.io import write

from rlekf import keys as K
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.devi import COLUMNS, main
from rlekf.optim import RLEKF
from rlekf.training.updaters import KalmanUpdater
from rlekf.uncertainty import calibration_path
from tests.helpers.frames import cu_frame, model_and_batch

TINY = {"embedding": [4, 8], "fitting": [8, 8], "axis_neuron": 2}
RCUT, SEL = 4.0, [40]


def _ckpt(path: Path, seed: int, kalman: bool = False, adam: bool = False) -> Path:
    frames = [cu_frame(1, rattle=0.05, seed=s) for s in range(2)]
    model, batch = model_and_batch(frames, ["Cu"], SEL, rcut=RCUT, seed=seed, **TINY)
    with torch.no_grad():
        model.energy_bias.fill_(float(np.mean([f.energy for f in frames])) / 4)
    ckpt = {
        "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
        "model_config": dict(model.config),
    }
    if kalman:
        opt = RLEKF(model.parameters(), block_size=128)
        up = KalmanUpdater(n_select=4, group_size=2, seed=0)
        for _ in range(2):
            up.update(model, batch, opt)
        ckpt["state_dict"] = {f"model.{k}": v for k, v in model.state_dict().items()}
        ckpt["optimizer_states"] = [opt.state_dict()]
    if adam:
        ckpt["optimizer_states"] = [torch.optim.Adam(model.parameters()).state_dict()]
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("devi")
    frames = [cu_frame(1, rattle=0.1, seed=10 + s) for s in range(3)]
    write(str(d / "traj.extxyz"), [f.to_atoms() for f in frames], format="extxyz")
    return {
        "dir": d,
        "frames": frames,
        "a": _ckpt(d / "a.ckpt", seed=1),
        "b": _ckpt(d / "b.ckpt", seed=2),
        "k": _ckpt(d / "k.ckpt", seed=3, kalman=True),
        "adam": _ckpt(d / "adam.ckpt", seed=4, adam=True),
    }


def _read(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    assert lines[1].split()[1:] == ["step", *COLUMNS]  # "# step max_devi_v ..."
    return np.loadtxt(path)


def test_committee_columns_equal_a_hand_computation(files, tmp_path):
    out = tmp_path / "model_devi.out"
    argv = [str(files["dir"] / "traj.extxyz"), "-m", str(files["a"]), "-m", str(files["b"])]
    assert main([*argv, "-o", str(out), "-f", "10"]) == 0
    got = _read(out)
    assert (tmp_path / "model_devi.png").stat().st_size > 0
    from rlekf.export import load_checkpoint

    models = [load_checkpoint(files[k])[0] for k in ("a", "b")]
    for i, frame in enumerate(files["frames"]):
        n = len(frame.numbers)
        batch = collate_atoms([frame_to_item(frame, ["Cu"], RCUT, SEL)])
        o = [m(batch, forces=True, virial=True) for m in models]
        # two models: the population standard deviation is half the difference
        dF = (o[0][K.FORCES] - o[1][K.FORCES]).detach().numpy() / 2
        dV = (o[0][K.VIRIAL] - o[1][K.VIRIAL]).detach().numpy().reshape(9) / 2 / n
        dE = float((o[0][K.ENERGY] - o[1][K.ENERGY]).detach()[0]) / 2 / n
        f_atom = np.sqrt((dF**2).sum(1))
        v = np.abs(dV)
        want = [
            10 * i,
            v.max(),
            v.min(),
            np.sqrt((v**2).mean()),  # DeePMD-kit: |σ_V| / 3 over 9 components
            f_atom.max(),
            f_atom.min(),
            f_atom.mean(),
            abs(dE),
        ]
        np.testing.assert_allclose(got[i], want, rtol=2e-6, atol=1e-12)


def test_kalman_source_and_calibration(files, tmp_path, capsys):
    out = tmp_path / "k.out"
    traj = str(files["dir"] / "traj.extxyz")
    assert main([traj, "-m", str(files["k"]), "-o", str(out)]) == 0
    assert "no uncertainty calibration" in capsys.readouterr().err
    raw = _read(out)
    assert raw.shape == (3, 8) and np.all(np.isfinite(raw)) and np.all(raw[:, 1:] > 0)
    assert "UNCALIBRATED" in out.read_text().splitlines()[0]
    # calibrate on labelled frames (the trajectory carries EMT labels), then run again
    assert main(["-m", str(files["k"]), "--calibrate", traj]) == 0
    assert calibration_path(files["k"]).is_file()
    assert main([traj, "-m", str(files["k"]), "-o", str(out)]) == 0
    cal = _read(out)
    assert "calibrated" in out.read_text().splitlines()[0]
    ratio = cal[:, 7] / raw[:, 7]  # devi_e scales by sqrt(energy_scale), the same every frame
    np.testing.assert_allclose(ratio, ratio[0], rtol=3e-6)  # 7 digits in the file
    calibration_path(files["k"]).unlink()


def test_bad_input_exits_nonzero_with_a_message(files, tmp_path, capsys):
    traj = str(files["dir"] / "traj.extxyz")
    assert main([traj, "-m", str(files["adam"])]) == 1
    assert "Adam" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.extxyz"), "-m", str(files["a"])]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "bad.extxyz").write_text("not a trajectory\n")
    assert main([str(tmp_path / "bad.extxyz"), "-m", str(files["a"])]) == 1
    assert "cannot read trajectory" in capsys.readouterr().err
    from ase import Atoms

    write(str(tmp_path / "h.extxyz"), Atoms("H2", positions=[[0, 0, 0], [0, 0, 0.7]]))
    assert main([str(tmp_path / "h.extxyz"), "-m", str(files["a"]), "-m", str(files["b"])]) == 1
    assert "H" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["-m", str(files["a"])])  # no trajectory
    assert exc.value.code == 2


@pytest.mark.slow
def test_installed_command_runs(files, tmp_path):
    exe = Path(sys.executable).parent / "rlekf-devi"
    if not exe.exists():
        exe = shutil.which("rlekf-devi")
        if exe is None:
            pytest.skip("rlekf-devi is not installed (run `make install`)")
    traj = str(files["dir"] / "traj.extxyz")
    res = subprocess.run(
        [str(exe), traj, "-m", str(files["a"]), "-m", str(files["b"]), "-o", "x.out"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "x.out").is_file() and (tmp_path / "x.png").is_file()


def test_deepmd_system_and_ase_traj_give_the_same_file(files, tmp_path):
    """The same 3 frames as a DeePMD system folder (written here by hand) and an ASE .traj."""
    from ase.io import Trajectory

    frames = files["frames"]
    system = tmp_path / "sys"
    (system / "set.000").mkdir(parents=True)
    (system / "type.raw").write_text("\n".join("0" for _ in frames[0].numbers) + "\n")
    (system / "type_map.raw").write_text("Cu\n")
    np.save(system / "set.000" / "coord.npy", np.stack([f.positions.reshape(-1) for f in frames]))
    np.save(system / "set.000" / "box.npy", np.stack([f.cell.reshape(-1) for f in frames]))
    with Trajectory(str(tmp_path / "t.traj"), "w") as traj:
        for f in frames:
            traj.write(f.to_atoms())
    committee = ["-m", str(files["a"]), "-m", str(files["b"])]
    outs = []
    for name, src in (
        ("x", files["dir"] / "traj.extxyz"),
        ("d", system),
        ("t", tmp_path / "t.traj"),
    ):
        assert main([str(src), *committee, "-o", str(tmp_path / f"{name}.out")]) == 0
        outs.append(_read(tmp_path / f"{name}.out"))
    assert outs[0].shape == (3, 8)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(outs[2], outs[0], rtol=1e-6, atol=1e-12)
