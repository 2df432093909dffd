"""Tests for :mod:`rlekf.data.readers` on real DFT data and on deliberately broken inputs."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

from rlekf.data.readers import (
    DataError,
    DataWarning,
    Frame,
    apply_type_map,
    read_frames,
    read_frames_with_report,
    resolve_format,
    type_map_from_frames,
    validate_frame,
)

# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------


def _shared_data_root() -> Path:
    env = os.environ.get("RLEKF_SHARED_DATA")
    if env:
        return Path(env)
    return (Path(__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()


@pytest.fixture(scope="module")
def shared_data() -> Path:
    root = _shared_data_root()
    if not root.is_dir():
        pytest.skip(
            f"shared DFT data not found at {root} (expected <repo>/../shared/data); "
            "set RLEKF_SHARED_DATA to its location to run these tests"
        )
    return root


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data file {path} is missing")
    return path


def _cu_atoms(rattle: float = 0.0, seed: int = 0):
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True)
    if rattle:
        atoms.rattle(rattle, seed=seed)
    return atoms


def _labelled(atoms, energy: float = -1.0, forces=None, stress=None):
    from ase.calculators.singlepoint import SinglePointCalculator

    kw = {"energy": energy}
    kw["forces"] = np.zeros((len(atoms), 3)) if forces is None else forces
    if stress is not None:
        kw["stress"] = stress
    atoms.calc = SinglePointCalculator(atoms, **kw)
    return atoms


def _write_extxyz(path: Path, images) -> Path:
    import ase.io

    with open(path, "w") as fh:
        for atoms in images:
            ase.io.write(fh, atoms, format="extxyz")
    return path


def _good_images(n: int = 3):
    return [_labelled(_cu_atoms(0.05, seed=k), energy=-10.0 - k) for k in range(n)]


def _frame(**over) -> Frame:
    atoms = _cu_atoms(0.02)
    kw = dict(
        positions=atoms.positions,
        cell=np.asarray(atoms.cell),
        pbc=np.ones(3, bool),
        numbers=atoms.numbers,
        energy=-1.0,
        forces=np.zeros((4, 3)),
        virial=None,
        source="mem.xyz",
        index=7,
    )
    kw.update(over)
    return Frame(**kw)


def _write_deepmd(d: Path, n_frames: int = 5, *, force_shape=None, bad_force_frame=None) -> Path:
    """A small valid deepmd/npy system (4 Cu atoms), optionally corrupted."""
    atoms = _cu_atoms()
    n = len(atoms)
    rng = np.random.default_rng(0)
    (d / "set.000").mkdir(parents=True)
    (d / "type.raw").write_text("0\n" * n)
    (d / "type_map.raw").write_text("Cu\n")
    coord = atoms.positions[None] + 0.03 * rng.standard_normal((n_frames, n, 3))
    force = rng.standard_normal((n_frames, n * 3))
    if bad_force_frame is not None:
        force[bad_force_frame, 4] = np.inf
    if force_shape is not None:
        force = rng.standard_normal(force_shape)
    np.save(d / "set.000" / "coord.npy", coord.reshape(n_frames, -1))
    np.save(d / "set.000" / "box.npy", np.tile(np.asarray(atoms.cell).ravel(), (n_frames, 1)))
    np.save(d / "set.000" / "energy.npy", -np.arange(n_frames, dtype=float))
    np.save(d / "set.000" / "force.npy", force)
    return d


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


def test_pwmat_cu_movement(shared_data: Path) -> None:
    path = _need(shared_data / "cu_pwmat" / "0_300_MOVEMENT")
    frames = read_frames(path)
    assert len(frames) == 100
    for k, fr in enumerate(frames):
        assert fr.positions.shape == (72, 3) and fr.forces.shape == (72, 3)
        assert fr.index == k and fr.source == str(path)
    fr = frames[0]
    assert fr.positions.dtype == np.float64 and fr.numbers.dtype == np.int64
    assert set(fr.numbers.tolist()) == {29} and fr.pbc.all()
    np.testing.assert_allclose(np.diag(fr.cell), [10.863786, 10.863786, 7.242524], atol=1e-5)
    e_per_atom = np.array([f.energy / f.n_atoms for f in frames])
    assert np.all(np.abs(e_per_atom + 4967.8) < 0.1)
    assert all(f.virial is not None and f.virial.shape == (3, 3) for f in frames)
    # SOURCE.md: the net force is not exactly zero (grid effect) but below 0.17 eV/Å
    assert max(np.abs(f.forces.sum(0)).max() for f in frames) < 0.2
    assert type_map_from_frames(frames) == ["Cu"]


def test_pwmat_virial_can_be_switched_off(shared_data: Path) -> None:
    path = _need(shared_data / "cu_pwmat" / "0_300_MOVEMENT")
    frames = read_frames(path, "pwmat/movement", use_virial=False)
    assert len(frames) == 100 and all(f.virial is None for f in frames)


def test_deepmd_water_single_system(shared_data: Path) -> None:
    path = _need(shared_data / "water_deepmd" / "data_0")
    frames = read_frames(path)
    assert len(frames) == 80
    fr = frames[0]
    assert fr.positions.shape == (192, 3) and fr.forces.shape == (192, 3)
    assert fr.numbers[:64].tolist() == [8] * 64 and fr.numbers[64:].tolist() == [1] * 128
    assert fr.virial is None and fr.pbc.all()
    np.testing.assert_allclose(np.diag(fr.cell), 12.444661, atol=1e-4)
    assert abs(fr.energy / 192 + 156.0) < 0.1
    assert type_map_from_frames(frames) == ["H", "O"]


def test_deepmd_water_parent_directory(shared_data: Path) -> None:
    root = _need(shared_data / "water_deepmd")
    frames, report = read_frames_with_report(root)
    assert len(frames) == 400 and report.n_read == 400 and report.n_skipped == 0
    assert [Path(f).name for f in report.files] == ["data_0", "data_1", "data_2", "data_3"]
    assert list(report.frames_per_file.values()) == [80, 160, 80, 80]
    assert frames[80].source.endswith("data_1") and frames[80].index == 0


def test_extxyz_si(shared_data: Path) -> None:
    import ase.io

    path = _need(shared_data / "si_mlearn" / "training.extxyz")
    frames = read_frames(path, "extxyz")
    assert len(frames) == 214
    counts = [f.n_atoms for f in frames]
    assert set(counts) == {12, 16, 18, 20, 24, 36, 40, 63, 64, 96}
    assert counts.count(64) == 145 and counts.count(63) == 57
    assert all(f.forces.shape == (f.n_atoms, 3) for f in frames)
    assert all(f.virial is not None for f in frames)
    # virial = -stress * V must agree with the virial info key written by the data scout
    raw = ase.io.read(path, index=":5", format="extxyz")
    for fr, atoms in zip(frames, raw, strict=False):
        np.testing.assert_allclose(fr.virial, np.reshape(atoms.info["virial"], (3, 3)), atol=1e-8)
    e_min = min(f.energy / f.n_atoms for f in frames)
    assert -5.5 < e_min < -5.3


def test_deepmd_mapbi3_with_virial(shared_data: Path) -> None:
    path = _need(shared_data / "mapbi3_dpgen" / "sys.000")
    frames = read_frames(path, "deepmd/npy")
    assert len(frames) == 733 and frames[0].n_atoms == 48
    assert all(f.virial is not None for f in frames)
    assert type_map_from_frames(frames) == ["C", "H", "I", "N", "Pb"]


def test_glob_and_list_of_paths(shared_data: Path) -> None:
    _need(shared_data / "cu_pwmat" / "1_500_MOVEMENT")
    frames, report = read_frames_with_report(
        str(shared_data / "cu_pwmat" / "*_MOVEMENT"), use_virial=False
    )
    assert len(frames) == 200
    assert [Path(f).name for f in report.files] == ["0_300_MOVEMENT", "1_500_MOVEMENT"]
    both = read_frames(
        [shared_data / "si_mlearn" / "training.extxyz", shared_data / "water_deepmd" / "data_0"]
    )
    assert len(both) == 214 + 80


def test_resolve_format(tmp_path: Path) -> None:
    assert resolve_format(tmp_path) == ("deepmd", "deepmd/npy")
    assert resolve_format(tmp_path / "0_300_MOVEMENT") == ("dpdata", "pwmat/movement")
    assert resolve_format(tmp_path / "OUTCAR") == ("ase", "vasp-out")
    assert resolve_format(tmp_path / "vasprun.xml") == ("ase", "vasp-xml")
    assert resolve_format(tmp_path / "a.extxyz") == ("ase", "extxyz")
    assert resolve_format(tmp_path / "a.traj") == ("ase", None)
    assert resolve_format(tmp_path / "x", "vasp/outcar") == ("ase", "vasp-out")
    assert resolve_format(tmp_path / "x", "ase:espresso-out") == ("ase", "espresso-out")
    assert resolve_format(tmp_path / "x", "dpdata:qe/pw/scf") == ("dpdata", "qe/pw/scf")


# --------------------------------------------------------------------------------------------
# Round trips and helpers
# --------------------------------------------------------------------------------------------


def test_extxyz_roundtrip_with_virial(tmp_path: Path) -> None:
    stress = np.array([0.01, 0.02, 0.03, 0.004, 0.005, 0.006])
    images = [_labelled(_cu_atoms(0.05, seed=k), -3.0 - k, stress=stress) for k in range(2)]
    path = _write_extxyz(tmp_path / "a.extxyz", images)
    frames = read_frames(path)
    assert len(frames) == 2 and frames[1].index == 1 and frames[1].energy == -4.0
    vol = images[0].get_volume()
    np.testing.assert_allclose(frames[0].virial, -images[0].get_stress(voigt=False) * vol)
    # Frame -> Atoms -> Frame keeps the labels
    back = Frame.from_atoms(frames[0].to_atoms(), "x", 0)
    np.testing.assert_allclose(back.virial, frames[0].virial, atol=1e-12)
    np.testing.assert_allclose(back.forces, frames[0].forces)
    assert back.symbols == ["Cu"] * 4
    assert read_frames(path, use_virial=False)[0].virial is None


def test_type_map_helpers() -> None:
    fr = _frame(numbers=[8, 1, 1, 29])
    assert type_map_from_frames([fr]) == ["Cu", "H", "O"]
    np.testing.assert_array_equal(apply_type_map(fr.numbers, ["O", "H", "Cu"]), [0, 1, 1, 2])


def test_element_not_in_type_map() -> None:
    fr = _frame(numbers=[8, 1, 1, 29])
    with pytest.raises(DataError) as exc:
        apply_type_map(fr.numbers, ["O", "H"], fr.source, fr.index)
    msg = str(exc.value)
    assert "Cu" in msg and "mem.xyz frame 7" in msg and "model.type_map" in msg


# --------------------------------------------------------------------------------------------
# Broken inputs
# --------------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.extxyz"
    with pytest.raises(DataError, match="not found") as exc:
        read_frames(missing)
    assert str(missing) in str(exc.value)
    with pytest.raises(DataError, match="matches no files"):
        read_frames(str(tmp_path / "*.xyz"))


def test_garbage_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.xyz"
    bad.write_text("hello world\nthis is not an xyz file\n")
    with pytest.raises(DataError, match="could not read") as exc:
        read_frames(bad)
    assert str(bad) in str(exc.value)
    mov = tmp_path / "broken_MOVEMENT"
    mov.write_text("hello\nworld\n")
    with pytest.raises(DataError, match="could not read .* as pwmat/movement"):
        read_frames(mov)
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="could not read"):
        read_frames(binary)


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.extxyz"
    empty.write_text("")
    with pytest.raises(DataError, match="empty") as exc:
        read_frames(empty)
    assert str(empty) in str(exc.value)
    blank = tmp_path / "blank.extxyz"
    blank.write_text("\n\n")
    with pytest.raises(DataError, match="no frames"):
        read_frames(blank)


def test_truncated_extxyz(tmp_path: Path) -> None:
    path = _write_extxyz(tmp_path / "t.extxyz", _good_images(3))
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-2]))  # cut the last frame in the middle
    with pytest.raises(DataError, match="frame 2") as exc:
        read_frames(path)
    assert str(path) in str(exc.value) and "truncated" in str(exc.value)
    with pytest.warns(DataWarning, match="skipped 1"):
        frames, report = read_frames_with_report(path, on_error="skip")
    assert len(frames) == 2 and report.n_skipped == 1
    assert report.skipped[0].index == 2 and report.skipped[0].reason == "unreadable tail"


def test_frame_without_forces(tmp_path: Path) -> None:
    import ase.io

    images = _good_images(2)
    no_forces = _cu_atoms(0.05)
    no_forces.info["energy"] = -3.0  # becomes a calculator with energy only
    path = _write_extxyz(tmp_path / "nf.extxyz", images)
    with open(path, "a") as fh:
        ase.io.write(fh, no_forces, format="extxyz")
    with pytest.raises(DataError, match="no forces") as exc:
        read_frames(path)
    assert f"{path} frame 2" in str(exc.value)
    no_label = tmp_path / "nolabel.extxyz"
    ase.io.write(no_label, _cu_atoms(), format="extxyz")
    with pytest.raises(DataError, match="frame 0: frame has no energy"):
        read_frames(no_label)


def test_nan_energy(tmp_path: Path) -> None:
    images = _good_images(3)
    _labelled(images[1], energy=float("nan"))
    path = _write_extxyz(tmp_path / "nan.extxyz", images)
    with pytest.raises(DataError, match="energy is nan") as exc:
        read_frames(path)
    assert f"{path} frame 1" in str(exc.value)


def test_inf_force_in_deepmd(tmp_path: Path) -> None:
    d = _write_deepmd(tmp_path / "sys", bad_force_frame=3)
    with pytest.raises(DataError, match="non-finite") as exc:
        read_frames(d)
    assert f"{d} frame 3" in str(exc.value) and "forces" in str(exc.value)
    good = read_frames(_write_deepmd(tmp_path / "ok"))
    assert len(good) == 5 and good[0].numbers.tolist() == [29] * 4


def test_mismatched_atom_counts_deepmd(tmp_path: Path) -> None:
    d = _write_deepmd(tmp_path / "sys", force_shape=(5, 3 * 3))  # 3 atoms of forces, not 4
    with pytest.raises(DataError, match="force.npy") as exc:
        read_frames(d)
    assert str(d) in str(exc.value) and "do not match" in str(exc.value)


def test_mismatched_shapes_frame() -> None:
    with pytest.raises(DataError, match="forces have shape") as exc:
        validate_frame(_frame(forces=np.zeros((3, 3))))
    assert "mem.xyz frame 7" in str(exc.value)
    with pytest.raises(DataError, match="numbers have shape"):
        validate_frame(_frame(numbers=[29, 29, 29]))
    with pytest.raises(DataError, match="virial have shape"):
        validate_frame(_frame(virial=np.zeros(6)))


def test_non_finite_arrays_frame() -> None:
    forces = np.zeros((4, 3))
    forces[2, 1] = np.inf
    with pytest.raises(DataError, match="forces contain 1 non-finite"):
        validate_frame(_frame(forces=forces))
    pos = _frame().positions.copy()
    pos[0, 0] = np.nan
    with pytest.raises(DataError, match="positions contain"):
        validate_frame(_frame(positions=pos))
    with pytest.raises(DataError, match="virial contain"):
        validate_frame(_frame(virial=np.full((3, 3), np.nan)))


def test_atoms_too_close() -> None:
    pos = _frame().positions.copy()
    pos[1] = pos[0] + [0.2, 0.0, 0.0]
    with pytest.raises(DataError, match=r"atoms 0 and 1 are 0\.2000 Å apart") as exc:
        validate_frame(_frame(positions=pos))
    assert "mem.xyz frame 7" in str(exc.value)


def test_atoms_too_close_through_periodic_image() -> None:
    cell = np.eye(3) * 10.0
    pos = np.array([[0.05, 5.0, 5.0], [9.9, 5.0, 5.0], [5.0, 5.0, 5.0]])
    kw = dict(positions=pos, cell=cell, numbers=[29] * 3, forces=np.zeros((3, 3)))
    with pytest.raises(DataError, match="periodic image"):
        validate_frame(_frame(**kw))
    validate_frame(_frame(pbc=[False, False, False], **kw))  # 9.85 Å apart without images
    validate_frame(_frame(pbc=[False, True, True], **kw))  # image along x only
    # a single atom in a too-small periodic cell overlaps its own image
    tiny = dict(
        positions=[[0.0, 0.0, 0.0]], cell=np.eye(3) * 0.25, numbers=[1], forces=[[0, 0, 0]]
    )
    with pytest.raises(DataError, match="periodic image of atom 0"):
        validate_frame(_frame(**tiny))


def test_duplicate_atom() -> None:
    pos = _frame().positions.copy()
    pos[3] = pos[1]
    with pytest.raises(DataError, match="atoms 1 and 3 are duplicates"):
        validate_frame(_frame(positions=pos))


def test_non_periodic_and_slab_cells_are_accepted() -> None:
    mol = _frame(pbc=[False] * 3, cell=np.zeros((3, 3)))
    validate_frame(mol)
    assert mol.volume == 0.0 and mol.to_atoms().calc.results.get("stress") is None
    slab_cell = np.diag([3.61, 3.61, 0.0])
    validate_frame(_frame(pbc=[True, True, False], cell=slab_cell))
    with pytest.raises(DataError, match="linearly dependent"):
        validate_frame(_frame(pbc=[True, True, True], cell=slab_cell))


def test_on_error_skip_counts_and_warns(tmp_path: Path) -> None:
    images = _good_images(5)
    _labelled(images[1], energy=float("inf"))
    images[3].positions[2] = images[3].positions[0] + [0.1, 0.0, 0.0]
    _labelled(images[3])
    path = _write_extxyz(tmp_path / "mixed.extxyz", images)
    with pytest.warns(DataWarning) as rec:
        frames, report = read_frames_with_report(path, on_error="skip")
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert "skipped 2" in msg and "non-finite energy: 1" in msg and "atoms too close: 1" in msg
    assert [f.index for f in frames] == [0, 2, 4]
    assert report.n_read == 3 and report.n_skipped == 2
    assert [s.index for s in report.skipped] == [1, 3]
    assert report.reasons() == {"non-finite energy": 1, "atoms too close": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_frames(_write_extxyz(tmp_path / "good.extxyz", _good_images(2)), on_error="skip")
    with pytest.raises(ValueError, match="on_error"):
        read_frames(path, on_error="ignore")


def test_directory_errors(tmp_path: Path) -> None:
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="no type.raw") as exc:
        read_frames(empty_dir)
    assert str(empty_dir) in str(exc.value)
    with pytest.raises(DataError, match="is a directory"):
        read_frames(empty_dir, "extxyz")
    d = _write_deepmd(tmp_path / "sys")
    (d / "type_map.raw").unlink()
    with pytest.raises(DataError, match="type_map.raw"):
        read_frames(d)
