"""On-the-fly learning (rlekf.otf, ``rlekf-otf``): the reference is called exactly where σ is
above the threshold, a labelled frame is absorbed, and the outputs and final checkpoint load."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from rlekf.calculator import DPCalculator
from rlekf.optim import RLEKF
from rlekf.otf import import_calculator, main, ramp, run_otf
from rlekf.training.updaters import KalmanUpdater
from rlekf.uncertainty import calibrate_checkpoint, calibration_path, load_covariance
from tests.helpers.frames import cu_frame, model_and_batch

TINY = {"embedding": [4, 8], "fitting": [8, 8], "axis_neuron": 2}
RCUT, SEL = 4.0, [40]
FAST = {"n_select": 4, "group_size": 2}  # 4-atom cells: 1 energy + 2 force updates per batch


class CountingEMT(EMT):
    """EMT that counts its energy/force evaluations (the reference calls)."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.n_calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        self.n_calls += 1
        if system_changes is None:
            super().calculate(atoms, properties)
        else:
            super().calculate(atoms, properties, system_changes)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny RLEKF checkpoint (4-atom Cu cells, a few Kalman batches), in the training format."""
    frames = [cu_frame(1, rattle=0.05, seed=s) for s in range(3)]
    model, batch = model_and_batch(frames, ["Cu"], SEL, rcut=RCUT, rcut_smth=0.5, **TINY)
    with torch.no_grad():
        model.energy_bias.fill_(float(np.mean([f.energy for f in frames])) / 4)
    opt = RLEKF(model.parameters(), block_size=64)
    up = KalmanUpdater(seed=0, **FAST)
    for _ in range(4):
        up.update(model, batch, opt)
    path = tmp_path_factory.mktemp("otf") / "model.ckpt"
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "model_config": dict(model.config),
            "optimizer_states": [opt.state_dict()],
            "updater_state": up.state_dict(),
            "trained_on_virials": False,
            "epoch": 3,
            "global_step": 12,
        },
        path,
    )
    calibrate_checkpoint(path, [batch], model=model, source="the 3 training cells")
    return path


def _atoms():
    return cu_frame(1, rattle=0.02, seed=7).to_atoms()


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _run(ckpt, out, threshold, ref=None, **kw):
    kw = {"steps": 6, "check_every": 2, "timestep_fs": 2.0, "updater": FAST, **kw}
    ref = CountingEMT() if ref is None else ref
    return run_otf(ckpt, _atoms(), ref, out, threshold=threshold, **kw), ref


def test_ramp():
    assert ramp(0, 300.0, 1200.0, 100) == 300.0
    assert ramp(50, 300.0, 1200.0, 100) == 750.0
    assert ramp(100, 300.0, 1200.0, 100) == ramp(500, 300.0, 1200.0, 100) == 1200.0
    assert ramp(3, 300.0, 1200.0, 0) == 1200.0


@pytest.mark.parametrize("threshold", [0.0, math.inf])
def test_threshold_zero_calls_every_check_and_inf_never(ckpt, tmp_path, threshold):
    res, ref = _run(ckpt, tmp_path, threshold)
    checks = _rows(tmp_path / "checks.csv")
    assert [int(r["step"]) for r in checks] == [0, 2, 4, 6]
    want = len(checks) if threshold == 0 else 0
    assert res.n_calls == want == len(_rows(tmp_path / "calls.csv"))
    assert ref.n_calls == want  # one reference evaluation per call, none elsewhere
    assert all(int(r["called"]) == (threshold == 0) for r in checks)


def test_calls_exactly_where_sigma_exceeds_the_threshold(ckpt, tmp_path):
    """A threshold between the σ values of a never-calling run: calls at the checks above it,
    none at those below (the checks before the first call see the same σ as that run)."""
    _run(ckpt, tmp_path / "free", math.inf, steps=12)
    sig = np.array([float(r["sigma"]) for r in _rows(tmp_path / "free" / "checks.csv")])
    assert np.ptp(sig) > 0  # σ moves along the MD
    thr = float(np.median(sig))
    _, ref = _run(ckpt, tmp_path / "thr", thr, steps=12)
    rows = _rows(tmp_path / "thr" / "checks.csv")
    called = [int(r["called"]) for r in rows]
    assert any(called) and not all(called)
    assert called == [int(float(r["sigma"]) > thr) for r in rows]
    first = called.index(1)
    np.testing.assert_allclose([float(r["sigma"]) for r in rows[: first + 1]], sig[: first + 1])
    assert ref.n_calls == sum(called)


def test_labelled_frame_is_absorbed_and_outputs_load(ckpt, tmp_path):
    """One call (max_calls=1): the frame's error, measured independently through
    DPCalculator on the input and final checkpoints against its EMT labels, falls."""
    from ase.io import read

    res, _ = _run(ckpt, tmp_path, 0.0, max_calls=1, repeats=3, steps=4)
    assert res.n_calls == 1
    for name in ("trajectory.extxyz", "labelled.extxyz", "checks.csv", "calls.csv"):
        assert (tmp_path / name).is_file(), name
    assert len(read(tmp_path / "trajectory.extxyz", index=":")) == 1  # step 0 (traj_every 10)
    (frame,) = read(tmp_path / "labelled.extxyz", index=":")
    e_ref, f_ref = frame.get_potential_energy(), frame.get_forces()
    emt = frame.copy()
    emt.calc = EMT()
    np.testing.assert_allclose(emt.get_forces(), f_ref, atol=1e-6)  # the labels are EMT's

    def errors(path):
        atoms = frame.copy()
        atoms.calc = DPCalculator.from_checkpoint(path, uncertainty=True)
        de = abs(atoms.get_potential_energy() - e_ref) / len(atoms)
        df = float(np.sqrt(np.mean((atoms.get_forces() - f_ref) ** 2)))
        return de, df, atoms.calc.results["energy_std"]

    e0, f0, s0 = errors(ckpt)
    e1, f1, s1 = errors(res.checkpoint)
    (call,) = _rows(tmp_path / "calls.csv")
    assert float(call["force_rmse_before"]) == pytest.approx(f0, rel=1e-6)
    assert float(call["force_rmse_after"]) == pytest.approx(f1, rel=1e-6)
    assert float(call["energy_error_before"]) == pytest.approx(e0, rel=1e-6)
    assert e1 < e0 and f1 < f0
    assert s1 < s0  # P shrank along the frame's directions
    assert int(call["kalman_updates"]) == 3 * 3  # 3 repeats x (1 energy + 2 force)
    # the final checkpoint keeps the training format and holds the updated P
    old = torch.load(ckpt, weights_only=True)
    new = torch.load(res.checkpoint, weights_only=True)
    assert set(old) <= set(new) and new["epoch"] == 3 and new["otf"]["reference_calls"] == 1
    cov = load_covariance(res.checkpoint, DPCalculator.from_checkpoint(res.checkpoint).model)
    assert cov.n_updates == int(old["optimizer_states"][0]["state"][0]["n_updates"]) + 9
    assert (
        json.loads(calibration_path(res.checkpoint).read_text())["energy_scale"]
        == (json.loads(calibration_path(ckpt).read_text())["energy_scale"])
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["reference_calls"] == 1 and summary["calibrated"]


def test_ramp_strain_and_error_log(ckpt, tmp_path):
    res, ref = _run(
        ckpt,
        tmp_path,
        math.inf,
        steps=4,
        temperature_end_K=900.0,
        strain=0.02,
        error_every=2,
        traj_every=2,
        sigma="force",
    )
    rows = _rows(tmp_path / "errors.csv")
    assert [int(r["step"]) for r in rows] == [0, 2, 4] and res.n_calls == 0
    assert float(rows[-1]["target_K"]) == 900.0 and float(rows[-1]["strain"]) == 0.02
    assert all(0 < float(r["relative_force_error"]) < math.inf for r in rows)
    from ase.io import read

    traj = read(tmp_path / "trajectory.extxyz", index=":")
    np.testing.assert_allclose(traj[-1].cell.lengths(), traj[0].cell.lengths() * 1.02)


def test_cli_and_bad_input(ckpt, tmp_path, capsys):
    atoms = _atoms()
    atoms.write(tmp_path / "start.extxyz")
    argv = [str(ckpt), "--structure", str(tmp_path / "start.extxyz"), "-o", str(tmp_path / "r")]
    fast = ["--n-select", "4", "--group-size", "2", "--steps", "2", "--check-every", "2"]
    assert main([*argv, *fast, "--threshold", "0"]) == 0
    assert "2 checks, 2 reference calls" in capsys.readouterr().out.splitlines()[-1]
    assert len(_rows(tmp_path / "r" / "calls.csv")) == 2
    DPCalculator.from_checkpoint(tmp_path / "r" / "final.ckpt", uncertainty=True)
    assert main([*argv, *fast, "--threshold", "0", "--reference", "ase.nope.X"]) == 1
    assert "cannot be imported" in capsys.readouterr().err
    with pytest.raises(ValueError, match="module.Class"):
        import_calculator("EMT")
    # an Adam checkpoint has no P
    sd = torch.load(ckpt, weights_only=True)
    model = DPCalculator.from_checkpoint(ckpt).model
    sd["optimizer_states"] = [torch.optim.Adam(model.parameters()).state_dict()]
    torch.save(sd, tmp_path / "adam.ckpt")
    argv[0] = str(tmp_path / "adam.ckpt")
    assert main([*argv, *fast, "--threshold", "0"]) == 1
    assert "Adam" in capsys.readouterr().err


@pytest.mark.parametrize("lam", [1.0, 0.95])
def test_forgetting_one_only_shrinks_p(ckpt, lam):
    """With lambda = 1 an update lowers g^T P g in every direction (P - K K^T / a); with
    lambda < 1 the division by lambda raises it in the directions the update does not see."""
    from rlekf.otf import atoms_batch, label_atoms, set_forgetting

    model = DPCalculator.from_checkpoint(ckpt).model
    opt = load_covariance(ckpt, model)
    set_forgetting(opt, lam)
    assert opt.lam == lam
    g = torch.randn(64, sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    before = opt.predictive_variance(g)
    batch = atoms_batch(label_atoms(_atoms(), EMT()), model)
    KalmanUpdater(seed=0, **FAST).update(model, batch, opt)
    ratio = (opt.predictive_variance(g) / before).numpy()
    if lam == 1.0:
        assert np.all(ratio <= 1 + 1e-12) and ratio.min() < 1
    else:
        assert ratio.max() > 1.01
    with pytest.raises(ValueError, match="forgetting"):
        set_forgetting(opt, 1.5)


def test_train_virial_assimilates_the_reference_stress(ckpt, tmp_path):
    """With train_virial every call adds one virial measurement (EMT gives a stress) and the
    final checkpoint says it was fitted to virials."""
    res, _ = _run(ckpt, tmp_path, 0.0, steps=2, updater={**FAST, "train_virial": True})
    assert res.n_calls == 2 and res.kalman_updates == 2 * (1 + 1 + 2)
    assert torch.load(res.checkpoint, weights_only=True)["trained_on_virials"] is True
    assert DPCalculator.from_checkpoint(res.checkpoint).trained_on_virials is True
