"""Descriptor statistics against an independent numpy computation (DeePMD-kit's definition).

The reference builds every atom's environment matrix by brute force over periodic images,
pads each atom to ``sum(sel)`` rows with zeros (DeePMD-kit counts empty slots) and takes
``np.mean``/``np.std`` per centre type: column 0 alone, columns 1–3 pooled.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from ase import Atoms

from rlekf.data.dataset import frame_to_item
from rlekf.data.readers import Frame
from rlekf.data.stats import env_statistics
from tests.helpers.frames import water_like_frame

RCUT, RCUT_SMTH = 5.0, 2.0


def _s(r: float) -> float:
    """s(r) of docs/deep-potential.md, written out by hand."""
    if r >= RCUT:
        return 0.0
    if r < RCUT_SMTH:
        return 1.0 / r
    u = (r - RCUT_SMTH) / (RCUT - RCUT_SMTH)
    return (u**3 * (-6.0 * u**2 + 15.0 * u - 10.0) + 1.0) / r


def _rows_by_type(frames, type_map, sel):
    """Every slot row (s, s·x/r, s·y/r, s·z/r) of every atom, padding included, per type."""
    rows = {t: [] for t in range(len(type_map))}
    for fr in frames:
        types = [type_map.index(sym) for sym in Atoms(numbers=fr.numbers).get_chemical_symbols()]
        for i, ti in enumerate(types):
            own = []
            for shift in itertools.product(range(-2, 3), repeat=3):
                for j in range(len(types)):
                    if j == i and shift == (0, 0, 0):
                        continue
                    d = fr.positions[j] + np.asarray(shift) @ fr.cell - fr.positions[i]
                    r = float(np.linalg.norm(d))
                    if r < RCUT:
                        s = _s(r)
                        own.append([s, *(s * d / r)])
            own += [[0.0, 0.0, 0.0, 0.0]] * (sum(sel) - len(own))
            rows[ti] += own
    return {t: np.array(v).reshape(-1, 4) for t, v in rows.items()}


def test_env_statistics_equal_an_independent_computation():
    frames = [water_like_frame(0), water_like_frame(1)]
    type_map, sel = ["H", "O", "Cu"], [80, 40, 10]  # no Cu in the data
    items = [frame_to_item(f, type_map, RCUT, sel, i) for i, f in enumerate(frames)]
    avg, std = env_statistics(items, len(type_map), RCUT_SMTH, RCUT)
    ref = _rows_by_type(frames, type_map, sel)
    for t in (0, 1):
        rows = ref[t]
        assert rows.shape[0] == (16 if t == 0 else 8) * 2 * sum(sel)
        assert np.any(rows[:, 0] == 0) and np.any(rows[:, 0] > 0)  # padding and neighbours
        np.testing.assert_allclose(avg[t], [rows[:, 0].mean(), 0, 0, 0], rtol=0, atol=1e-12)
        np.testing.assert_allclose(std[t, 0], rows[:, 0].std(), rtol=1e-10)
        np.testing.assert_allclose(std[t, 1:], rows[:, 1:].ravel().std(), rtol=1e-10)
    # a type without atoms: DeePMD-kit's defaults (mean 0, std 0.1)
    np.testing.assert_array_equal(avg[2], 0.0)
    np.testing.assert_array_equal(std[2], 0.1)


def test_env_statistics_protect_a_vanishing_spread():
    lone = Frame(
        positions=np.zeros((1, 3)),
        cell=np.zeros((3, 3)),
        pbc=np.array([False] * 3),
        numbers=np.array([29]),
        energy=0.0,
        forces=np.zeros((1, 3)),
        virial=None,
        source="<lone atom>",
        index=0,
    )
    item = frame_to_item(lone, ["Cu"], RCUT, [10])
    avg, std = env_statistics([item], 1, RCUT_SMTH, RCUT)
    np.testing.assert_array_equal(avg, 0.0)
    assert std.tolist() == [[pytest.approx(1e-2)] * 4]  # all slots empty: spread 0 -> 1e-2
