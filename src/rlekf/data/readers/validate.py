"""Checks every frame passes before it is used: shapes, finiteness, cell, close atoms."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from rlekf.data.frames import SKIP_HINT, DataError, Frame
from rlekf.data.neighbors import pair_list

__all__ = ["MIN_DISTANCE", "validate_frame"]

#: Minimum allowed interatomic distance in Å (periodic images included).
MIN_DISTANCE: float = 0.3

#: Neighbour-search radius (Å) used to find pairs closer than ``MIN_DISTANCE`` quickly.
_SEARCH_CUTOFF: float = 1.5


def validate_frame(frame: Frame, *, min_distance: float = MIN_DISTANCE) -> None:
    """Check one frame for shape, finiteness, cell and geometry problems.

    Checks, in order: array shapes and atom counts agree; at least one atom; atomic numbers are
    real elements; positions, cell, energy, forces and virial are finite; periodic lattice
    vectors are non-degenerate; no two atoms (including periodic images and duplicates) are
    closer than ``min_distance``.

    Args:
        frame: The frame to check.
        min_distance: Smallest allowed interatomic distance in Å.

    Raises:
        DataError: Naming ``frame.source`` and ``frame.index`` and the problem.
    """
    src, idx = frame.source, frame.index

    def fail(what: str, reason: str, hint: str = SKIP_HINT) -> DataError:
        return DataError(what, source=src, index=idx, hint=hint, reason=reason)

    pos = frame.positions
    if pos.ndim != 2 or pos.shape[1] != 3:
        raise fail(f"positions have shape {pos.shape}, expected (n_atoms, 3)", "bad shape")
    n = pos.shape[0]
    if n == 0:
        raise fail("frame has no atoms", "no atoms")
    checks = [
        ("numbers", frame.numbers.shape, (n,)),
        ("forces", frame.forces.shape, (n, 3)),
        ("cell", frame.cell.shape, (3, 3)),
        ("pbc", frame.pbc.shape, (3,)),
    ]
    if frame.virial is not None:
        checks.append(("virial", frame.virial.shape, (3, 3)))
    for name, got, want in checks:
        if got != want:
            raise fail(
                f"{name} have shape {got} but expected {want} for {n} atoms "
                "(atom counts or array shapes do not match)",
                "shape mismatch",
            )
    bad_z = (frame.numbers < 1) | (frame.numbers > 118)
    if bad_z.any():
        k = int(np.flatnonzero(bad_z)[0])
        raise fail(
            f"atom {k} has atomic number {int(frame.numbers[k])}, not a chemical element",
            "bad atomic number",
        )

    if not math.isfinite(frame.energy):
        raise fail(f"energy is {frame.energy}", "non-finite energy")
    arrays = [("positions", pos), ("cell", frame.cell), ("forces", frame.forces)]
    if frame.virial is not None:
        arrays.append(("virial", frame.virial))
    for name, arr in arrays:
        bad = ~np.isfinite(arr)
        if bad.any():
            first = np.argwhere(bad)[0]
            raise fail(
                f"{name} contain {int(bad.sum())} non-finite value(s) (nan/inf), first "
                f"{arr[tuple(first)]} at index {tuple(int(i) for i in first)}",
                f"non-finite {name}",
            )

    pbc = frame.pbc
    if pbc.any():
        vecs = frame.cell[pbc]
        sv = np.linalg.svd(vecs, compute_uv=False)
        if sv.min() < 1e-6:
            raise fail(
                f"periodic lattice vectors {vecs.tolist()} (pbc={pbc.tolist()}) are zero or "
                "linearly dependent",
                "degenerate cell",
                hint="give a proper cell or set pbc=False along non-periodic directions",
            )
    _check_min_distance(frame, min_distance, fail)


def _check_min_distance(frame: Frame, cutoff: float, fail: Callable[..., DataError]) -> None:
    """Raise ``fail(...)`` if any pair (periodic images included) is closer than ``cutoff``.

    Each pair is counted once (:func:`rlekf.data.neighbors.pair_list` with a half list).
    """
    if frame.n_atoms < 2 and not frame.pbc.any():
        return
    # A cell list with a 0.3 Å cutoff has very many cells and is slow; search a larger sphere
    # (few extra pairs) and filter.
    search = max(cutoff, _SEARCH_CUTOFF)
    i, j, shifts, dist = pair_list(frame.positions, frame.cell, frame.pbc, search, full_list=False)
    close = dist < cutoff
    if not close.any():
        return
    i, j, shifts, dist = i[close], j[close], shifts[close], dist[close]
    k = int(np.argmin(dist))
    a, b, d = int(i[k]), int(j[k]), float(dist[k])
    s = tuple(int(x) for x in shifts[k])
    if a == b or any(s):
        what = (
            f"atom {a} and the periodic image of atom {b} (cell shift {s}) are {d:.4f} Å apart"
            f" (< {cutoff} Å)"
        )
    elif d < 1e-8:
        what = f"atoms {a} and {b} are duplicates (distance {d:.2e} Å)"
    else:
        what = f"atoms {a} and {b} are {d:.4f} Å apart (< {cutoff} Å)"
    raise fail(
        f"{what}; {len(dist)} pair(s) closer than {cutoff} Å",
        "atoms too close",
        hint="this usually means a corrupt structure, wrong units or a wrong cell; " + SKIP_HINT,
    )
