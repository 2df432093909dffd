"""AtomsDataModule: splits that respect MD blocks and files, persistence, batching, statistics."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ase.io import write

from rlekf.data import AtomsDataModule
from rlekf.data import keys as K
from rlekf.data.datamodule import split_frames
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.data.readers import DataError, Frame
from rlekf.data.stats import energy_bias
from tests.helpers.frames import cu_frame, model_and_batch


def _frames(n, source="a.xyz", size=1):
    out = []
    for i in range(n):
        f = cu_frame(size, seed=i)
        f.source, f.index = source, i
        out.append(f)
    return out


@pytest.fixture()
def xyz_files(tmp_path):
    paths = []
    for name, n in (("run1.extxyz", 12), ("run2.extxyz", 12), ("run3.extxyz", 12)):
        path = tmp_path / name
        write(path, [f.to_atoms() for f in _frames(n, name)], format="extxyz")
        paths.append(str(path))
    return paths


def test_block_split_keeps_time_blocks_whole():
    frames = _frames(20, "md.xyz") + _frames(20, "md2.xyz")
    idx = split_frames(frames, "blocks", 0.25, 0.25, n_blocks=5, seed=0)
    assert sorted(idx["train"] + idx["val"] + idx["test"]) == list(range(40))
    where = {i: name for name, ids in idx.items() for i in ids}
    for start in range(0, 40, 4):  # 5 blocks of 4 frames per file
        assert len({where[i] for i in range(start, start + 4)}) == 1
    assert idx["val"] and idx["test"]


def test_file_split_keeps_files_whole():
    frames = _frames(5, "a") + _frames(5, "b") + _frames(5, "c")
    idx = split_frames(frames, "files", 0.34, 0.34, n_blocks=1, seed=0)
    for name, ids in idx.items():
        assert len(ids) == 5, name
        assert len({frames[i].source for i in ids}) == 1


def test_empty_training_split_is_a_clear_error():
    with pytest.raises(DataError, match="training split would be empty"):
        split_frames(_frames(2), "random", 0.5, 0.5, n_blocks=1, seed=0)


def test_split_is_persisted_and_reused(tmp_path, xyz_files):
    kw = dict(
        path=xyz_files,
        type_map=["Cu"],
        rcut=5.0,
        sel=[60],
        split="files",
        val_fraction=0.34,
        test_fraction=0.34,
        split_dir=tmp_path / "run",
    )
    dm = AtomsDataModule(seed=0, **kw)
    dm.setup("fit")
    saved = json.loads((tmp_path / "run" / "split.json").read_text())
    assert {s for s, _ in saved["val"]}.isdisjoint({s for s, _ in saved["train"]})
    dm2 = AtomsDataModule(seed=123, **kw)  # another seed, same run folder: same split
    dm2.setup("fit")
    for name in ("train", "val", "test"):
        ids1 = dm.datasets[name][0][K.FRAME_ID].tolist() + [len(dm.datasets[name])]
        ids2 = dm2.datasets[name][0][K.FRAME_ID].tolist() + [len(dm2.datasets[name])]
        assert ids1 == ids2


def test_explicit_validation_file_and_no_test_split(tmp_path, xyz_files):
    dm = AtomsDataModule(
        path=xyz_files[0], val_path=xyz_files[1], type_map=["Cu"], rcut=5.0, sel=[60], split="none"
    )
    dm.setup("fit")
    assert len(dm.datasets["train"]) == 12 and len(dm.datasets["val"]) == 12
    assert dm.datasets["test"] is dm.datasets["val"]


def test_no_validation_data_is_a_clear_error(xyz_files):
    dm = AtomsDataModule(path=xyz_files[0], type_map=["Cu"], rcut=5.0, sel=[60], split="none")
    with pytest.raises(DataError, match="validation split .* is empty"):
        dm.setup("fit")


def test_element_not_in_type_map_names_file_and_frame(xyz_files):
    dm = AtomsDataModule(path=xyz_files[0], type_map=["Ag"], rcut=5.0, sel=[60])
    with pytest.raises(DataError, match=r"Cu.*run1\.extxyz frame 0.*type_map"):
        dm.setup("fit")


def test_too_many_neighbours_names_file_and_frame(xyz_files):
    dm = AtomsDataModule(path=xyz_files[0], type_map=["Cu"], rcut=5.0, sel=[10])
    with pytest.raises(DataError, match=r"run1\.extxyz frame \d+.*sel\[0\]=10"):
        dm.setup("fit")


def test_missing_file_is_a_clear_error(tmp_path):
    dm = AtomsDataModule(path=tmp_path / "nope.xyz", type_map=["Cu"], rcut=5.0, sel=[60])
    with pytest.raises(DataError, match="nope.xyz"):
        dm.setup("fit")


def test_batches_of_different_atom_counts_predict_like_single_frames():
    frames = [cu_frame(1, seed=1), cu_frame(2, seed=2)]
    model, batch = model_and_batch(
        frames, ["Cu"], [100], embedding=(4, 8), fitting=(8,), axis_neuron=4
    )
    both = model(batch)
    for k, f in enumerate(frames):
        single = model(collate_atoms([frame_to_item(f, ["Cu"], 6.0, [100])]))
        assert torch.allclose(both[K.ENERGY][k], single[K.ENERGY][0], rtol=1e-13)
        sl = slice(0, 4) if k == 0 else slice(4, 36)
        assert torch.allclose(both[K.FORCES][sl], single[K.FORCES], rtol=1e-12, atol=1e-14)


def test_energy_bias_is_least_squares_per_element():
    counts = np.array([[2, 1], [1, 3], [4, 4], [0, 5]])
    energies = counts @ np.array([-3.0, -1.5])
    assert np.allclose(energy_bias(energies, counts), [-3.0, -1.5])


def test_stats_and_loaders(tmp_path, xyz_files):
    dm = AtomsDataModule(
        path=xyz_files,
        type_map=["Cu"],
        rcut=5.0,
        sel=[60],
        split="random",
        batch_size=4,
        eval_batch_size=5,
    )
    stats = dm.stats()
    assert stats["env_std"].shape == (1, 4) and np.all(stats["env_std"] > 0)
    assert stats["has_virial"] is True
    e = [float(it[K.ENERGY][0]) / 4 for it in dm.datasets["train"].items]
    assert stats["energy_bias"][0] == pytest.approx(np.mean(e), rel=1e-12)
    batch = next(iter(dm.train_dataloader()))
    assert batch[K.N_ATOMS].tolist() == [4, 4, 4, 4]
    assert batch[K.NEIGHBORS].max() < 16


def test_mixed_sizes_from_real_si_data(shared_data):
    dm = AtomsDataModule(
        path=shared_data / "si_mlearn" / "training.extxyz",
        type_map=["Si"],
        rcut=5.0,
        sel=[60],
        split="random",
        batch_size=2,
    )
    dm.setup("fit")
    sizes = {int(it[K.N_ATOMS][0]) for it in dm.datasets["train"].items}
    assert len(sizes) > 1
    for batch in dm.train_dataloader():
        assert len(set(batch[K.N_ATOMS].tolist())) == 1


def test_frame_dataclass_roundtrip():
    f = Frame(
        positions=np.zeros((1, 3)),
        cell=np.eye(3) * 5,
        pbc=[True] * 3,
        numbers=[29],
        energy=-1.0,
        forces=np.zeros((1, 3)),
    )
    assert f.to_atoms().get_potential_energy() == -1.0


# --------------------------------------------------------------------------- honest splits
def _placeholders(n, source="gen"):
    """Stand-ins for frames: the split only looks at ``source``."""
    return [SimpleNamespace(source=source, index=i) for i in range(n)]


def test_stratified_blocks_hold_out_the_same_share_of_every_part():
    # 4 parts of 30 frames, 6 blocks of 5 per part; 1 validation and 1 test block per part
    idx = split_frames(_placeholders(120), "blocks", 0.15, 0.15, n_blocks=6, seed=3, strata=4)
    assert sorted(idx["train"] + idx["val"] + idx["test"]) == list(range(120))
    for name in ("val", "test"):
        parts = [i // 30 for i in idx[name]]
        assert [parts.count(k) for k in range(4)] == [5, 5, 5, 5], name
        for k in range(4):  # one whole block of 5 consecutive frames
            mine = [i for i in idx[name] if i // 30 == k]
            assert mine == list(range(mine[0], mine[0] + 5)) and mine[0] % 5 == 0
    # stratified random: the same count of single frames from every part
    rnd = split_frames(_placeholders(120), "random", 0.1, 0.1, n_blocks=1, seed=0, strata=4)
    assert [sum(i // 30 == k for i in rnd["test"]) for k in range(4)] == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="strata"):
        split_frames(_placeholders(12), "files", 0.1, 0.1, n_blocks=1, seed=0, strata=2)
    with pytest.raises(DataError, match=r"part 1/2 of gen \(6 frames\)"):
        split_frames(_placeholders(12), "blocks", 0.3, 0.3, n_blocks=2, seed=0, strata=2)


def test_strata_1_keeps_the_unstratified_split():
    """Existing runs re-derive the same split from their seed."""
    frames = _placeholders(40, "a") + _placeholders(20, "b")
    for mode in ("blocks", "random"):
        a = split_frames(frames, mode, 0.2, 0.1, n_blocks=5, seed=7)
        b = split_frames(frames, mode, 0.2, 0.1, n_blocks=5, seed=7, strata=1)
        assert a == b


def test_emt_default_validation_and_test_cover_every_temperature(tmp_path):
    """data=cu_emt: each split holds every temperature, validation and test in equal shares.

    The generated set is ordered by temperature; before stratification the block split gave
    the validation and the test split one (strain, temperature) run each.
    """
    from rlekf.data.emt import frame_conditions
    from tests.helpers.hydra import compose_cfg

    cfg = compose_cfg("train", [], tmp_path).data
    n = int(cfg.path.n_frames)
    temps = [t for t, _ in frame_conditions(n)]
    idx = split_frames(
        _placeholders(n),
        cfg.split,
        cfg.val_fraction,
        cfg.test_fraction,
        cfg.n_blocks,
        int(cfg.seed),
        int(cfg.strata),
    )
    everything = sorted(set(temps))
    assert len(everything) == 4
    for name in ("train", "val", "test"):
        got = [temps[i] for i in idx[name]]
        assert sorted(set(got)) == everything, name
        if name != "train":
            assert len({got.count(t) for t in everything}) == 1, (name, got)
    assert len(idx["val"]) == len(idx["test"]) == n // 12


def test_every_preset_has_an_explicit_test_split(tmp_path):
    from tests.helpers.hydra import compose_cfg

    for preset in ("cu_emt", "cu_pwmat", "si_mlearn", "water_deepmd", "mapbi3_dpgen", "ec_pwmat"):
        d = compose_cfg("train", [f"data={preset}"], tmp_path).data
        held_out = d.get("test_path") is not None or (d.split != "none" and d.test_fraction > 0)
        assert held_out, preset
    si = compose_cfg("train", ["data=si_mlearn"], tmp_path).data
    assert si.test_path.endswith("si_mlearn/test.extxyz") and si.get("val_path") is None


def test_ec_pwmat_preset_splits_the_trajectory_by_time_blocks(shared_data, tmp_path):
    import hydra

    from tests.helpers.hydra import compose_cfg

    if not (shared_data / "ec_pwmat" / "EC_MOVEMENT").exists():
        pytest.skip("../shared/data/ec_pwmat is absent")
    cfg = compose_cfg("train", ["data=ec_pwmat"], tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")  # a neighbour count above sel would raise here
    sizes = {k: len(dm.datasets[k]) for k in ("train", "val", "test")}
    assert sizes == {"train": 160, "val": 20, "test": 20}
    assert dm.type_map == ["H", "C", "O"]
    idx = json.loads((tmp_path / "split.json").read_text())
    for name in ("val", "test"):  # one block of 20 consecutive frames each
        got = sorted(i for _, i in idx[name])
        assert got == list(range(got[0], got[0] + 20)), name


def test_cu_pwmat_tests_on_the_end_of_the_500K_run_apart_from_validation(shared_data, tmp_path):
    import hydra

    from tests.helpers.hydra import compose_cfg

    cfg = compose_cfg("train", ["data=cu_pwmat"], tmp_path)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    train, val, test = (dm.datasets[k] for k in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (100, 70, 20)
    assert test is not val
    v = dm._read(dm.val_paths)  # the whole 500 K run
    assert len(v) == 100
    e_val = sorted(float(it[K.ENERGY][0]) for it in val.items)
    e_test = sorted(float(it[K.ENERGY][0]) for it in test.items)
    assert e_val == sorted(f.energy for f in v[:70])
    assert e_test == sorted(f.energy for f in v[80:])


def test_held_out_frame_ranges_are_checked(tmp_path, xyz_files):
    kw = dict(path=xyz_files[0], type_map=["Cu"], rcut=5.0, sel=[60], split="none")
    dm = AtomsDataModule(
        val_path=xyz_files[1], val_frames=[0, 6], test_path=xyz_files[1], test_frames="8:12", **kw
    )
    dm.setup("fit")
    assert len(dm.datasets["val"]) == 6 and len(dm.datasets["test"]) == 4
    with pytest.raises(ValueError, match="overlap the validation frames"):
        AtomsDataModule(val_path=xyz_files[1], test_path=xyz_files[1], **kw)
    with pytest.raises(ValueError, match="overlap the validation frames"):
        AtomsDataModule(
            val_path=xyz_files[1],
            val_frames=[0, 6],
            test_path=xyz_files[1],
            test_frames=[5, 9],
            **kw,
        )
    with pytest.raises(ValueError, match="also in data.path"):
        AtomsDataModule(val_path=xyz_files[1], test_path=xyz_files[0], **kw)
    with pytest.raises(ValueError, match="start < stop"):
        AtomsDataModule(val_path=xyz_files[1], val_frames=[6, 6], **kw)
    dm = AtomsDataModule(val_path=xyz_files[1], val_frames=[0, 13], **kw)
    with pytest.raises(DataError, match="up to 12 but .*run2.extxyz.* hold 12 frames"):
        dm.setup("fit")
