"""Neighbour lists in the per-type slot layout of se_e2_a.

The pair search itself is done by `vesin <https://github.com/Luthaf/vesin>`_ (a cell-list
library that handles any triclinic cell, including cells smaller than twice the cutoff, and
mixed periodicity); ``ase.neighborlist.neighbor_list`` is the fallback when vesin is missing.
This module only sorts the pairs into the fixed-size slots the Deep Potential descriptor reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "AUTO_SEL_RATIO",
    "NeighborOverflowError",
    "SlotNeighbors",
    "auto_sel",
    "max_neighbor_counts",
    "pair_list",
    "parse_sel",
    "slot_neighbors",
]

#: Default margin of ``sel=auto`` (DeePMD-kit's ``sel: "auto"`` uses the same 1.1).
AUTO_SEL_RATIO: float = 1.1


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
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    cutoff: float,
    *,
    full_list: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """All ordered pairs (i, j, S) with |r_j + S·cell − r_i| < cutoff, i≠j or S≠0.

    Args:
        positions: (n, 3) Å.
        cell: (3, 3) Å, rows are lattice vectors (ignored along non-periodic directions).
        pbc: (3,) bool.
        cutoff: Å.
        full_list: both (i, j, S) and (j, i, −S) of every pair; ``False``: one of the two.

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
        return _ase_pairs(positions, cell, pbc, cutoff, full_list)
    nl = NeighborList(cutoff=float(cutoff), full_list=full_list)
    periodic = bool(pbc.all()) if pbc.all() or not pbc.any() else pbc.tolist()
    i, j, s, d = nl.compute(points=positions, box=box, periodic=periodic, quantities="ijSd")
    return (
        np.asarray(i, dtype=np.int64),
        np.asarray(j, dtype=np.int64),
        np.asarray(s, dtype=np.int64).reshape(-1, 3),
        np.asarray(d, dtype=np.float64),
    )


def _ase_pairs(positions, cell, pbc, cutoff, full_list=True):  # pragma: no cover - fallback
    from ase import Atoms
    from ase.neighborlist import neighbor_list

    atoms = Atoms(positions=positions, cell=cell, pbc=pbc)
    i, j, s, d = neighbor_list("ijSd", atoms, float(cutoff))
    if not full_list:  # i < j, and of an atom's own images the S whose first non-zero is > 0
        keep = (i < j) | ((i == j) & (np.sign(s) @ np.array([4, 2, 1]) > 0))
        i, j, s, d = i[keep], j[keep], s[keep], d[keep]
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


def max_neighbor_counts(
    positions: np.ndarray,
    cell: np.ndarray,
    pbc: np.ndarray,
    types: np.ndarray,
    cutoff: float,
    ntypes: int,
) -> np.ndarray:
    """Largest number of neighbours of each type within ``cutoff`` over the atoms of one frame.

    Counts pairs with distance < ``cutoff``, the pairs :func:`slot_neighbors` keeps.

    Args:
        positions: (n, 3) Å.
        cell: (3, 3) Å.
        pbc: (3,) bool.
        types: (n,) type index of each atom (< ``ntypes``).
        cutoff: Å.
        ntypes: number of types.

    Returns:
        (ntypes,) int64.
    """
    types = np.asarray(types, dtype=np.int64)
    i, j, _, d = pair_list(positions, cell, pbc, cutoff)
    keep = d < cutoff
    counts = np.zeros((len(types), ntypes), dtype=np.int64)
    np.add.at(counts, (i[keep], types[j[keep]]), 1)
    return counts.max(axis=0) if len(types) else np.zeros(ntypes, dtype=np.int64)


def parse_sel(sel: object) -> float | None:
    """The margin of an ``auto`` sel (``"auto"`` or ``"auto:RATIO"``), ``None`` for a list.

    Raises:
        ValueError: a string that is not ``auto[:RATIO]`` with RATIO >= 1.
    """
    if not isinstance(sel, str):
        return None
    word, _, ratio = sel.partition(":")
    try:
        value = float(ratio) if ratio else AUTO_SEL_RATIO
    except ValueError:
        value = float("nan")
    if word != "auto" or not value >= 1.0:
        raise ValueError(
            f"sel must be a list of neighbour counts per type, 'auto' or 'auto:RATIO' with "
            f"RATIO >= 1 (e.g. auto:1.2); got {sel!r}"
        )
    return value


def auto_sel(max_counts: np.ndarray, ratio: float = AUTO_SEL_RATIO) -> list[int]:
    """``sel`` from the largest neighbour counts: DeePMD-kit's ``sel: "auto"`` rule.

    Each count is multiplied by ``ratio``, truncated to an integer and rounded up to a
    multiple of 4 (``4 * ceil(floor(ratio * n) / 4)``); a type never seen as a neighbour
    gets 4 slots.

    Args:
        max_counts: (ntypes,) largest neighbour count of each type over the training frames.
        ratio: margin (>= 1).
    """
    out = []
    for n in np.asarray(max_counts, dtype=np.int64).tolist():
        scaled = int(n * ratio)
        out.append(max(4, 4 * ((scaled + 3) // 4)))
    return out
