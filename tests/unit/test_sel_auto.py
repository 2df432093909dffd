"""``data.sel=auto``: neighbour counts against a brute-force count over cell images, the
rounding rule, and the data module / model wiring."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from ase.io import write
from omegaconf import OmegaConf

from rlekf.data import AtomsDataModule
from rlekf.data.neighbors import AUTO_SEL_RATIO, auto_sel, max_neighbor_counts, parse_sel
from rlekf.data.readers import Frame
from rlekf.utils.instantiate import instantiate_model
from tests.helpers.frames import cu_frame, water_like_frame


def _brute_force_counts(frame: Frame, types: np.ndarray, rcut: float, reach: int) -> np.ndarray:
    """Largest per-type count of (j, image) with 0 < |r_j + S cell - r_i| < rcut, by loops."""
    nt = int(types.max()) + 1
    shifts = [np.array(s) for s in itertools.product(range(-reach, reach + 1), repeat=3)]
    best = np.zeros(nt, dtype=np.int64)
    for i in range(len(types)):
        count = np.zeros(nt, dtype=np.int64)
        for j in range(len(types)):
            for s in shifts:
                r = np.linalg.norm(frame.positions[j] + s @ frame.cell - frame.positions[i])
                if 0.0 < r < rcut:
                    count[types[j]] += 1
        best = np.maximum(best, count)
    return best


def _triclinic_cu() -> Frame:
    """One-atom primitive fcc cell (2.55 Å vectors at 60°): many images within the cutoff."""
    from ase.build import bulk

    atoms = bulk("Cu", "fcc", a=3.61)
    atoms.positions += 0.05
    return Frame(atoms.positions, atoms.cell.array, atoms.pbc, atoms.numbers, 0.0,
                 np.zeros((1, 3)))  # fmt: skip


@pytest.mark.parametrize(
    "frame, rcut, reach",
    [
        (water_like_frame(seed=2), 4.0, 1),
        (cu_frame(size=2, seed=1), 5.0, 1),
        (_triclinic_cu(), 4.5, 4),
    ],
    ids=["water", "cu-cubic", "cu-triclinic"],
)
def test_counts_equal_a_brute_force_count(frame, rcut, reach):
    types = np.where(frame.numbers == 1, 1, 0)
    nt = int(types.max()) + 1
    got = max_neighbor_counts(frame.positions, frame.cell, frame.pbc, types, rcut, nt)
    np.testing.assert_array_equal(got, _brute_force_counts(frame, types, rcut, reach))


def test_rounding_rule():
    for n, ratio in itertools.product([0, 1, 3, 41, 78, 83, 100], [1.0, 1.1, 1.25]):
        expected = max(4, math.ceil(math.floor(n * ratio) / 4) * 4)
        assert auto_sel(np.array([n]), ratio) == [expected]
        assert auto_sel(np.array([n]), ratio)[0] >= n
    assert auto_sel(np.array([83, 41])) == [92, 48]  # 91.3 -> 92, 45.1 -> 48


def test_parse_sel():
    assert parse_sel("auto") == AUTO_SEL_RATIO == 1.1
    assert parse_sel("auto:1.3") == 1.3
    assert parse_sel([46, 92]) is None
    for bad in ("auto:0.9", "autox", "auto:x", "all"):
        with pytest.raises(ValueError, match="auto:RATIO"):
            parse_sel(bad)


@pytest.fixture(scope="module")
def water_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sel") / "water.extxyz"
    frames = [water_like_frame(seed=s) for s in range(10)]
    for f in frames:
        f.forces = np.random.default_rng(0).normal(size=f.forces.shape)
    write(path, [f.to_atoms() for f in frames], format="extxyz")
    return path, frames


def _module(path, sel, tmp_path):
    return AtomsDataModule(path=path, type_map=["O", "H"], rcut=4.0, sel=sel, fmt="extxyz",
                           split="random", val_fraction=0.2, test_fraction=0.2, seed=0,
                           split_dir=tmp_path, use_virial=False)  # fmt: skip


def test_datamodule_chooses_sel_from_the_training_frames(water_file, tmp_path):
    path, frames = water_file
    dm = _module(path, "auto:1.2", tmp_path)
    assert dm.resolve_sel() == dm.sel
    train = dm.datasets["train"]
    largest = np.zeros(2, dtype=np.int64)
    for f in train.frames:
        types = np.where(f.numbers == 1, 1, 0)
        largest = np.maximum(largest, _brute_force_counts(f, types, 4.0, 1))
    assert dm.sel == auto_sel(largest, 1.2)
    assert dm.state_dict() == {
        "sel_auto": {
            "rule": "auto:1.2",
            "max_neighbors": largest.tolist(),
            "frames": len(train),
            "sel": dm.sel,
        }  # fmt: skip
    }
    assert len(train) < len(frames)  # only the training split was counted
    assert train.items[0]["neighbors"].shape[1] == sum(dm.sel)
    # an explicit list keeps working and records nothing
    fixed = _module(path, [30, 60], tmp_path)
    fixed.setup("fit")
    assert fixed.sel == [30, 60] and fixed.state_dict() == {}


def test_the_model_is_built_with_the_chosen_sel(water_file, tmp_path):
    path, _ = water_file
    dm = _module(path, "auto", tmp_path)
    cfg = OmegaConf.create(
        {"_target_": "rlekf.models.DeepPotential", "type_map": ["O", "H"], "rcut": 4.0,
         "sel": "auto", "embedding": [2, 4], "fitting": [4], "axis_neuron": 2}
    )  # fmt: skip
    model = instantiate_model(cfg, dm)
    assert model.sel == dm.sel == model.config["sel"]
    assert all(isinstance(s, int) for s in model.sel)
