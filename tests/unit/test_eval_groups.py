"""Errors per frame group (rlekf-eval group_by=...): subsets and metrics by hand."""

from __future__ import annotations

import numpy as np
import pytest

from rlekf.evaluation import EvalResult, compute_metrics, frame_groups, metrics_by_group


def _result(seed: int = 0) -> EvalResult:
    rng = np.random.default_rng(seed)
    n_atoms = np.array([2, 3, 1, 4])
    n = int(n_atoms.sum())
    e_dft = rng.normal(size=4)
    return EvalResult(
        frame_id=np.arange(4),
        source=["a.xyz"] * 4,
        index=np.arange(4),
        n_atoms=n_atoms,
        energy_dft=e_dft,
        energy_pred=e_dft + rng.normal(scale=0.1, size=4),
        atom_frame=np.repeat(np.arange(4), n_atoms),
        symbols=np.array(["Si", "O"] * (n // 2)),
        forces_dft=rng.normal(size=(n, 3)),
        forces_pred=rng.normal(size=(n, 3)),
    )


def test_metrics_by_group_equal_errors_computed_by_hand():
    res = _result()
    groups = ["A", "B", "A", "B"]
    got = metrics_by_group(res, groups)
    assert sorted(got) == ["A", "B"]
    for g, frames in (("A", [0, 2]), ("B", [1, 3])):
        e = [(res.energy_pred[i] - res.energy_dft[i]) / res.n_atoms[i] for i in frames]
        atoms = [a for a in range(len(res.atom_frame)) if res.atom_frame[a] in frames]
        f = (res.forces_pred[atoms] - res.forces_dft[atoms]).ravel()
        m = got[g]
        assert m["n_frames"] == len(frames)
        assert m["n_atoms"] == sum(res.n_atoms[i] for i in frames)
        assert m["energy_mae"] == pytest.approx(np.mean(np.abs(e)), rel=1e-12)
        assert m["energy_rmse"] == pytest.approx(np.sqrt(np.mean(np.square(e))), rel=1e-12)
        assert m["energy_mean_error"] == pytest.approx(np.mean(e), rel=1e-12)
        assert m["force_mae"] == pytest.approx(np.mean(np.abs(f)), rel=1e-12)
        assert m["force_rmse"] == pytest.approx(np.sqrt(np.mean(f**2)), rel=1e-12)
    assert metrics_by_group(res, ["all"] * 4)["all"] == compute_metrics(res)
    with pytest.raises(ValueError, match="3 group labels for 4 frames"):
        metrics_by_group(res, ["A", "B", "A"])


def test_frame_groups_read_the_extxyz_info_key(tmp_path):
    from ase import Atoms
    from ase.io import write

    path = tmp_path / "g.extxyz"
    frames = []
    for i, g in enumerate(["Surface", "AIMD", None, "AIMD"]):
        a = Atoms("Si2", positions=[[0, 0, 0], [1.2, 1.2, 1.2 + i]], cell=[5, 5, 5], pbc=True)
        if g is not None:
            a.info["group"] = g
        frames.append(a)
    write(path, frames, format="extxyz")
    res = _result()
    res.source = [str(path)] * 4
    res.index = np.array([3, 0, 1, 2])
    assert frame_groups(res, "group") == ["AIMD", "Surface", "AIMD", "-"]
    res.index = np.array([0, 1, 2, 9])
    with pytest.raises(ValueError, match="frame 9 is not in the file"):
        frame_groups(res, "group")
