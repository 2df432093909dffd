"""The one structure-to-inputs converter shared by the data set and the ASE calculator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlekf import keys as K
from rlekf.calculator import DPCalculator
from rlekf.data.converter import AtomsConverter, UnknownElementError, apply_type_map
from rlekf.data.dataset import AtomsDataset, collate_atoms
from rlekf.data.readers import DataError, Frame
from tests.helpers.frames import model_and_batch, water_like_frame

SMALL = {"embedding": [8, 16], "fitting": [16, 16], "axis_neuron": 4}


def _reference_types(numbers, type_map):
    """Type indices by a dictionary of symbols (independent of the lookup table)."""
    from ase.data import chemical_symbols

    index = {sym: t for t, sym in enumerate(type_map)}
    return np.array([index[chemical_symbols[z]] for z in numbers], dtype=np.int64)


def test_types_equal_a_symbol_dictionary():
    rng = np.random.default_rng(0)
    type_map = ["O", "H", "Cu", "Ag", "C"]
    numbers = rng.choice([8, 1, 29, 47, 6], size=50)
    want = _reference_types(numbers, type_map)
    np.testing.assert_array_equal(apply_type_map(numbers, type_map), want)
    np.testing.assert_array_equal(AtomsConverter(type_map, 5.0, [4] * 5).types(numbers), want)


def test_unknown_elements_are_data_errors_naming_file_frame_and_elements():
    conv = AtomsConverter(["O", "H"], 5.0, [4, 4])
    with pytest.raises(UnknownElementError) as exc:
        conv.types([8, 29, 1, 79], "w.xyz", 4)
    assert isinstance(exc.value, DataError) and exc.value.elements == ["Au", "Cu"]
    assert "element Cu in w.xyz frame 4 is not in type_map ['O', 'H']" in str(exc.value)
    with pytest.raises(DataError, match="'Xx' is not a chemical element"):
        AtomsConverter(["O", "Xx"], 5.0, [4, 4])


def test_calculator_and_data_set_feed_the_model_the_same_inputs():
    """The calculator's one-frame batch equals the collated data set item of the same frame."""
    frame = water_like_frame(seed=1)
    frame.positions[2] += 2 * frame.cell[0]  # an unwrapped atom: non-zero shifts
    model, _ = model_and_batch([frame], ["O", "H"], [60, 120], **SMALL)
    calc = DPCalculator(model, type_map=model.type_map, rcut=model.rcut, sel=model.sel)
    assert isinstance(calc.converter, AtomsConverter)
    atoms = frame.to_atoms()
    from_calc = calc.converter(atoms)
    data = AtomsDataset([frame], model.type_map, model.rcut, model.sel)
    from_data = collate_atoms([data[0]])
    for key in (K.POSITIONS, K.CELL, K.TYPES, K.BATCH, K.NEIGHBORS):
        assert torch.equal(from_calc[key], from_data[key]), key
    assert torch.equal(from_calc[K.SHIFTS], from_data[K.SHIFTS].to(from_calc[K.SHIFTS].dtype))
    assert from_calc[K.SHIFTS].abs().sum() > 0
    atoms.calc = calc
    out = {k: v.detach() for k, v in model(from_data, forces=True).items()}
    assert atoms.get_potential_energy() == pytest.approx(float(out[K.ENERGY][0]), abs=1e-10)
    np.testing.assert_allclose(atoms.get_forces(), out[K.FORCES].numpy(), atol=1e-10)


def test_item_dtypes_and_frame_error_names():
    frame = Frame(
        positions=[[0.0, 0.0, 0.0], [1.5, 0.0, 0.0]],
        cell=np.eye(3) * 6.0,
        pbc=True,
        numbers=[29, 29],
        energy=-1.0,
        forces=np.zeros((2, 3)),
        source="cu.xyz",
        index=3,
    )
    item = AtomsConverter(["Cu"], 3.0, [8], dtype=torch.float32).inputs(
        frame.positions, frame.cell, frame.pbc, frame.numbers, source="cu.xyz", index=3
    )
    assert item[K.POSITIONS].dtype == torch.float32 and item[K.CELL].shape == (1, 3, 3)
    assert item[K.NEIGHBORS].dtype == torch.int32 and item[K.SHIFTS].dtype == torch.int16
    assert item[K.MAX_COUNT].tolist() == [1]
    with pytest.raises(DataError, match=r"cu\.xyz frame 3: an atom has 1 neighbours") as exc:
        AtomsDataset([frame], ["Cu"], 3.0, [0])
    assert type(exc.value.__cause__).__name__ == "NeighborOverflowError"
