"""Neighbour lists (vesin) against a brute-force search, small cells included."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from rlekf.data.neighbors import NeighborOverflowError, _ase_pairs, pair_list, slot_neighbors


def brute_force(positions, cell, pbc, cutoff):
    reps = [
        int(
            np.ceil(
                cutoff
                / (
                    np.linalg.det(cell)
                    / np.linalg.norm(np.cross(cell[(k + 1) % 3], cell[(k + 2) % 3]))
                )
            )
        )
        + 1
        if pbc[k]
        else 0
        for k in range(3)
    ]
    pairs = set()
    n = len(positions)
    for s in itertools.product(*[range(-r, r + 1) for r in reps]):
        off = np.array(s) @ cell
        for i in range(n):
            d = np.linalg.norm(positions + off - positions[i], axis=1)
            for j in np.nonzero(d < cutoff)[0]:
                if i == j and not any(s):
                    continue
                pairs.add((i, int(j), *s))
    return pairs


def from_slots(nl):
    pairs = set()
    for i, row in enumerate(nl.neighbors):
        for m, j in enumerate(row):
            if j >= 0:
                pairs.add((i, int(j), *nl.shifts[i, m].tolist()))
    return pairs


@pytest.mark.parametrize(
    "cell, pbc",
    [
        (np.diag([4.0, 4.5, 5.0]), [True, True, True]),  # smaller than 2·rcut
        (np.array([[3.0, 0, 0], [1.2, 3.1, 0], [0.4, 0.7, 3.3]]), [True, True, True]),  # triclinic
        (np.diag([5.0, 5.0, 30.0]), [True, True, False]),  # slab
        (np.zeros((3, 3)), [False, False, False]),  # molecule
    ],
)
def test_neighbor_list_equals_brute_force(cell, pbc):
    rng = np.random.default_rng(0)
    n = 6
    box = np.diag(cell) if np.any(cell) else np.full(3, 4.0)
    frac = rng.uniform(0, 1, (n, 3))
    positions = frac @ cell if np.any(cell) else frac * box
    types = np.array([0, 1, 0, 1, 1, 0])
    cutoff = 4.2
    nl = slot_neighbors(positions, cell, np.array(pbc), types, cutoff, [200, 200])
    assert from_slots(nl) == brute_force(positions, cell, pbc, cutoff)
    # slots of type k hold only type-k neighbours, sorted by distance
    for i, row in enumerate(nl.neighbors):
        for k, (lo, hi) in enumerate([(0, 200), (200, 400)]):
            js = row[lo:hi]
            js = js[js >= 0]
            assert np.all(types[js] == k)
            d = np.linalg.norm(
                positions[js] + nl.shifts[i, lo : lo + len(js)] @ cell - positions[i], axis=1
            )
            assert np.all(np.diff(d) >= -1e-12)


def test_overflow_is_an_error_not_a_silent_cut():
    positions = np.random.default_rng(1).uniform(0, 3, (10, 3))
    with pytest.raises(NeighborOverflowError, match=r"sel\[0\]=3"):
        slot_neighbors(
            positions,
            np.eye(3) * 3,
            np.array([True] * 3),
            np.zeros(10, int),
            4.0,
            [3],
            where="x.xyz frame 2",
        )


@pytest.mark.parametrize(
    "cell, pbc",
    [
        (np.diag([4.0, 4.5, 5.0]), [True, True, True]),
        (np.array([[3.0, 0, 0], [1.2, 3.1, 0], [0.4, 0.7, 3.3]]), [True, True, True]),
        (np.diag([5.0, 5.0, 30.0]), [True, True, False]),
        (np.zeros((3, 3)), [False, False, False]),
        (np.eye(3) * 1.1, [True, True, True]),  # atoms see their own images
    ],
)
@pytest.mark.parametrize("backend", ["vesin", "ase"])
def test_half_pair_list_holds_each_pair_once(cell, pbc, backend):
    rng = np.random.default_rng(3)
    positions = rng.uniform(0, 1, (5, 3)) @ (cell if np.any(cell) else np.eye(3) * 4.0)
    cutoff = 3.1
    if backend == "vesin":
        i, j, s, d = pair_list(positions, cell, np.array(pbc), cutoff, full_list=False)
    else:
        i, j, s, d = _ase_pairs(positions, cell, np.array(pbc), cutoff, full_list=False)
    half = {(int(a), int(b), *map(int, t)) for a, b, t in zip(i, j, s, strict=True)}
    mirror = {(b, a, -x, -y, -z) for a, b, x, y, z in half}
    full = brute_force(positions, cell, pbc, cutoff)
    assert len(half) == len(i) and not half & mirror
    assert half | mirror == full
    np.testing.assert_allclose(
        d, np.linalg.norm(positions[j] + s @ cell - positions[i], axis=1), atol=1e-12
    )
