"""Exported files written by earlier rlekf versions keep loading and give the same numbers.

The fixture in ``tests/data/legacy`` was written by ``make_export_v1.py`` with rlekf at commit
22ff6c0 (format 1: the TorchScript copy of the forward pass, positional inputs): a checkpoint,
its export and that version's eager outputs on ``water_like_frame(0)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rlekf import keys as K
from rlekf.calculator import DPCalculator
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.export import export_model, load_checkpoint, load_exported
from tests.helpers.frames import water_like_frame

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")

LEGACY = Path(__file__).parents[1] / "data" / "legacy"


@pytest.fixture(scope="module")
def batch():
    item = frame_to_item(water_like_frame(0), ["H", "O"], 6.0, [80, 40])
    return collate_atoms([item])


def test_format_1_file_loads_and_equals_its_recorded_outputs(batch):
    ref = np.load(LEGACY / "water_v1_ref.npz")
    module, meta = load_exported(LEGACY / "water_v1.pt")
    assert meta["format_version"] == 1 and module.type_map == ["H", "O"]
    out = module(batch, forces=True, virial=True)
    for key in (K.ENERGY, K.FORCES, K.VIRIAL, K.ATOM_ENERGY):
        np.testing.assert_allclose(out[key].detach().numpy(), ref[key], rtol=0, atol=1e-10)
    assert set(module(batch, forces=False)) == {K.ENERGY, K.ATOM_ENERGY}


def test_current_model_export_and_calculators_equal_the_format_1_outputs(batch, tmp_path):
    ref = np.load(LEGACY / "water_v1_ref.npz")
    model, _ = load_checkpoint(LEGACY / "water_v1.ckpt")
    new = load_exported(export_model(model, tmp_path / "v2.pt"))[0]
    for out in (model(batch, forces=True, virial=True), new(batch, forces=True, virial=True)):
        for key in (K.ENERGY, K.FORCES, K.VIRIAL, K.ATOM_ENERGY):
            np.testing.assert_allclose(out[key].detach().numpy(), ref[key], rtol=0, atol=1e-10)
    atoms = water_like_frame(0).to_atoms()
    results = []
    for calc in (
        DPCalculator.from_file(LEGACY / "water_v1.pt"),
        DPCalculator.from_file(tmp_path / "v2.pt"),
        DPCalculator.from_checkpoint(LEGACY / "water_v1.ckpt"),
    ):
        atoms.calc = calc
        results.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    for energy, forces, stress in results[1:]:
        assert energy == pytest.approx(results[0][0], abs=1e-10)
        np.testing.assert_allclose(forces, results[0][1], rtol=0, atol=1e-10)
        np.testing.assert_allclose(stress, results[0][2], rtol=0, atol=1e-12)
    assert results[0][0] == pytest.approx(float(ref["energy"][0]), abs=1e-10)
