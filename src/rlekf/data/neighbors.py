"""Neighbour lists in the per-type slot layout of se_e2_a.

The pair search itself is done by `vesin <https://github.com/Luthaf/vesin>`_ (a cell-list
library that handles any triclinic cell, including cells smaller than twice the cutoff, and
mixed periodicity); ``ase.neighborlist.neighbor_list`` is the fallback when vesin is missing.
This module only sorts the pairs into the fixed-size slots the Deep Potential descriptor reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["NeighborOverflowError", "SlotNeighbors", "pair_list", "slot_neighbors"]


class NeighborOverflowError(ValueError):
    """An atom has more neighbours of one type than ``sel`` allows."""


@dataclass(frozen=True)
class SlotNeighbors:
    """Neighbours of every atom of one frame, sorted into per-type slots.

    Attributes:
        neighbors: (n, M) int64, local index of the neighbour, -1 for an empty slot. Slots
            ``[off_k, off_k + sel[k])`` hold neighbours of type ``k`` sorted by distance.
        shifts: (n, M, 3) int64 integer cell shifts; neighbour position is
            ``pos[j] + shift @ cell``.
        max_count: (ntypes,) int64, largest neighbour count of each type over all atoms.
    """

    neighbors: np.ndarray
    shifts: np.ndarray
    max_count: np.ndarray


def pair_list(
    positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs (i, j, S) with |r_j + S·cell − r_i| < cutoff, i≠j or S≠0.

    Args:
        positions: (n, 3) Å.
        cell: (3, 3) Å, rows are lattice vectors (ignored along non-periodic directions).
        pbc: (3,) bool.
        cutoff: Å.

    Returns:
        i (p,), j (p,), S (p, 3) int64, d (p,) distances in Å.
    """
    positions = np.ascontiguousarray(positions, dtype=np.float64)
    pbc = np.asarray(pbc, dtype=bool).reshape(3)
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    box = cell if pbc.any() else np.zeros((3, 3))
    try:
        from vesin import NeighborList
    except ImportError:  # pragma: no cover - exercised only without vesin
        return _ase_pairs(positions, cell, pbc, cutoff)
    nl = NeighborList(cutoff=float(cutoff), full_list=True)
    periodic = bool(pbc.all()) if pbc.all() or not pbc.any() else pbc.tolist()
    i, j, s, d = nl.compute(points=positions, box=box, periodic=periodic, quantities="ijSd")
    return (
        np.asarray(i, dtype=np.int64),
        np.asarray(j, dtype=np.int64),
        np.asarray(s, dtype=np.int64).reshape(-1, 3),
        np.asarray(d, dtype=np.float64),
    )


def _ase_pairs(positions, cell, pbc, cutoff):  # pragma: no cover - fallback
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    atoms = Atoms(positions=positions, cell=cell, pbc=pbc)
    i, j, s, d = neighbor_list("ijSd", atoms, float(cutoff))
    return i.astype(np.int64), j.astype(np.int64), s.astype(np.int64), d


def slot_neighbors(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    types: np.ndarray,
    cutoff: float,
    sel: list[int] | tuple[int, ...],
    *,
    where: str = "",
) -> SlotNeighbors:
    """Build the se_e2_a slot layout: per atom, neighbours of type k in ``sel[k]`` slots.

    Args:
        positions: (n, 3) Å.
        cell: (3, 3) Å.
        pbc: (3,) bool.
        types: (n,) int64 type index of each atom.
        cutoff: the model's ``rcut`` in Å.
        sel: maximum neighbours kept per type; exceeding it is an error, never a silent cut.
        where: a label (file and frame) used in error messages.

    Raises:
        NeighborOverflowError: an atom has more neighbours of a type than ``sel`` allows.
    """
    types = np.asarray(types, dtype=np.int64)
    n = len(types)
    ntypes = len(sel)
    i, j, s, d = pair_list(positions, cell, pbc, cutoff)
    keep = d < cutoff
    i, j, s, d = i[keep], j[keep], s[keep], d[keep]
    tj = types[j]
    if tj.size and tj.max() >= ntypes:
        raise ValueError(f"{where}: atom type {tj.max()} but sel has only {ntypes} entries")
    # sort by (i, neighbour type, distance) so each atom's slots fill in order
    order = np.lexsort((d, tj, i))
    i, j, s, tj = i[order], j[order], s[order], tj[order]
    counts = np.zeros((n, ntypes), dtype=np.int64)
    np.add.at(counts, (i, tj), 1)
    max_count = counts.max(axis=0) if n else np.zeros(ntypes, dtype=np.int64)
    over = np.nonzero(max_count > np.asarray(sel))[0]
    if over.size:
        k = int(over[0])
        raise NeighborOverflowError(
            f"{where}: an atom has {int(max_count[k])} neighbours of type {k} within "
            f"rcut={cutoff} Å but sel[{k}]={sel[k]}; raise model.sel[{k}] to at least "
            f"{int(max_count[k])} (plus a margin for compressed configurations)"
        )
    offsets = np.concatenate([[0], np.cumsum(sel)[:-1]]).astype(np.int64)
    # rank of each pair within its (i, type) group
    group_start = np.zeros((n, ntypes), dtype=np.int64)
    flat = counts.reshape(-1)
    starts = np.concatenate([[0], np.cumsum(flat)[:-1]]).reshape(n, ntypes)
    group_start[:] = starts
    rank = np.arange(len(i)) - group_start[i, tj]
    slot = offsets[tj] + rank
    m = int(np.sum(sel))
    neighbors = np.full((n, m), -1, dtype=np.int64)
    shifts = np.zeros((n, m, 3), dtype=np.int64)
    neighbors[i, slot] = j
    shifts[i, slot] = s
    return SlotNeighbors(neighbors=neighbors, shifts=shifts, max_count=max_count)
