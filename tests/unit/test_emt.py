"""Tests for the embedded Cu/EMT data set (:mod:`rlekf.data.emt`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from rlekf.data import emt
from rlekf.data.emt import cache_name, ensure_cu_emt, generate_cu_emt, load_cu_emt
from rlekf.data.readers import DataWarning, read_frames, validate_frame

# 12 blocks (4 temperatures x 3 strains) of 2 frames, 32 atoms: well under a second.
SMALL = {"n_frames": 24, "size": 2}


@pytest.fixture(scope="module")
def small_frames():
    return generate_cu_emt(**SMALL)


def test_shapes_and_labels(small_frames) -> None:
    assert len(small_frames) == 24
    for k, fr in enumerate(small_frames):
        assert fr.index == k
        assert fr.positions.shape == (32, 3) and fr.forces.shape == (32, 3)
        assert fr.virial is not None and fr.virial.shape == (3, 3)
        assert fr.numbers.tolist() == [29] * 32 and fr.pbc.all()
        assert np.isfinite(fr.energy)
        frac = np.linalg.solve(fr.cell.T, fr.positions.T).T
        assert frac.min() >= -1e-9 and frac.max() < 1.0 + 1e-9  # wrapped into the cell
        validate_frame(fr)
        # Newton's third law: EMT forces sum to zero
        np.testing.assert_allclose(fr.forces.sum(axis=0), 0.0, atol=1e-8)
        np.testing.assert_allclose(fr.virial, fr.virial.T, atol=1e-10)


def test_labels_are_ase_emt(small_frames) -> None:
    from ase.calculators.emt import EMT

    for fr in small_frames[::7]:
        atoms = fr.to_atoms()
        atoms.calc = EMT()
        assert atoms.get_potential_energy() == pytest.approx(fr.energy, abs=1e-10)
        np.testing.assert_allclose(atoms.get_forces(), fr.forces, atol=1e-10)
        virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
        np.testing.assert_allclose(virial, fr.virial, atol=1e-10)


def test_blocks_ordered_by_temperature_and_strain(small_frames) -> None:
    # two frames per block; within a block the cell is fixed, across strains it changes
    vols = np.array([fr.volume for fr in small_frames]).reshape(12, 2)
    np.testing.assert_allclose(vols[:, 0], vols[:, 1])
    per_strain = vols[:, 0].reshape(4, 3)  # (temperature, strain)
    assert np.all(np.diff(per_strain, axis=1) > 0)  # -2 % < 0 % < +2 %
    # hotter blocks have higher potential energy on average
    e = np.array([fr.energy for fr in small_frames]).reshape(4, 6).mean(axis=1)
    assert e[-1] > e[0]
    # sampled frames within one block are not identical
    assert np.abs(small_frames[0].positions - small_frames[1].positions).max() > 0.01


def test_deterministic_for_seed(small_frames) -> None:
    again = generate_cu_emt(**SMALL)
    for a, b in zip(small_frames, again, strict=True):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell, b.cell)
        np.testing.assert_array_equal(a.forces, b.forces)
        np.testing.assert_array_equal(a.virial, b.virial)
        assert a.energy == b.energy
    other = generate_cu_emt(seed=1, **SMALL)
    assert not np.allclose(other[0].positions, small_frames[0].positions)


def test_default_size_has_108_atoms_and_uneven_split() -> None:
    frames = generate_cu_emt(n_frames=13, temperatures=(300.0,), strains=(0.0, 0.01))
    assert len(frames) == 13 and frames[0].n_atoms == 108
    vols = [fr.volume for fr in frames]
    assert len(set(np.round(vols[:7], 8))) == 1 and len(set(np.round(vols[7:], 8))) == 1


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        generate_cu_emt(n_frames=0)
    with pytest.raises(ValueError):
        generate_cu_emt(temperatures=())
    with pytest.raises(TypeError):
        cache_name(bogus=1)


def test_cache_roundtrip_and_reuse(tmp_path: Path, small_frames, monkeypatch) -> None:
    path = ensure_cu_emt(tmp_path, **SMALL)
    assert path.name == f"{cache_name(**SMALL)}.extxyz" and path.parent == tmp_path
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["params"]["n_frames"] == 24 and meta["params"]["seed"] == 0
    assert meta["n_frames"] == 24 and len(meta["sha256"]) == 64
    # no temporary files are left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.stem + ".json"]

    back = read_frames(path)
    assert len(back) == len(small_frames)
    for a, b in zip(small_frames, back, strict=True):
        assert b.source == str(path)
        assert b.energy == pytest.approx(a.energy, abs=1e-9)
        np.testing.assert_allclose(b.forces, a.forces, atol=1e-7)  # extxyz keeps 8 decimals
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-7)
        np.testing.assert_allclose(b.virial, a.virial, atol=1e-8)

    # second call reuses the file: no generation, unchanged mtime
    mtime = path.stat().st_mtime_ns

    def boom(**_: object) -> None:
        raise AssertionError("cache should have been reused")

    monkeypatch.setattr(emt, "generate_cu_emt", boom)
    time.sleep(0.01)
    assert ensure_cu_emt(tmp_path, **SMALL) == path
    assert path.stat().st_mtime_ns == mtime
    assert [fr.source for fr in load_cu_emt(tmp_path, **SMALL)][:1] == [str(path)]
    # explicit defaults hash like implicit ones; other parameters give another file
    assert cache_name(**SMALL) == cache_name(seed=0, a=3.61, **SMALL)
    assert cache_name(**SMALL) != cache_name(seed=1, **SMALL)


@pytest.mark.slow  # 20 s: regenerates the default EMT set (make test-full)
def test_corrupted_cache_is_regenerated(tmp_path: Path) -> None:
    path = ensure_cu_emt(tmp_path, **SMALL)
    original = path.read_bytes()
    path.write_bytes(original[: len(original) // 2])  # truncated by a crash / disk issue
    with pytest.warns(DataWarning, match="sha256"):
        again = ensure_cu_emt(tmp_path, **SMALL)
    assert again == path and path.read_bytes() == original

    path.with_suffix(".json").write_text("{not json")
    with pytest.warns(DataWarning, match="unreadable"):
        ensure_cu_emt(tmp_path, **SMALL)
    assert json.loads(path.with_suffix(".json").read_text())["n_frames"] == 24

    path.with_suffix(".json").unlink()
    with pytest.warns(DataWarning, match="missing"):
        ensure_cu_emt(tmp_path, **SMALL)
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.stem + ".json"]


def test_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch) -> None:
    def fail_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(emt.os, "replace", fail_replace)
    with pytest.raises(OSError, match="disk full"):
        ensure_cu_emt(tmp_path, n_frames=12, size=1)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    path = ensure_cu_emt(tmp_path, n_frames=12, size=1)
    assert len(read_frames(path)) == 12


@pytest.mark.slow
def test_defaults_give_the_documented_set() -> None:
    frames = generate_cu_emt()
    assert len(frames) == 240 and frames[0].n_atoms == 108
    assert all(f.virial is not None for f in frames)
