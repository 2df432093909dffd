"""dpdata backend: a ``dpdata.LabeledSystem`` (deepmd/npy, PWmat MOVEMENT, any dpdata format)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from rlekf.data.frames import DataError, Frame, unreadable
from rlekf.data.readers.deepmd import check_deepmd_dir

__all__ = ["iter_dpdata"]


def iter_dpdata(path: Path, fmt: str, use_virial: bool) -> Iterator[Frame | DataError]:
    """Yield the frames of a dpdata ``LabeledSystem`` (not yet validated).

    A deepmd/npy system's array sizes are checked first (:func:`check_deepmd_dir`).

    Args:
        path: The file, or the system directory for deepmd/npy.
        fmt: dpdata format name (``"deepmd/npy"``, ``"pwmat/movement"``, ...).
        use_virial: Whether to read the virials.

    Raises:
        DataError: The file cannot be parsed, a type name is not an element, or the arrays
            hold different frame counts.
    """
    from ase.data import atomic_numbers

    if fmt == "deepmd/npy":
        check_deepmd_dir(path)
    try:
        import dpdata

        system = dpdata.LabeledSystem(str(path), fmt=fmt)
        data = system.data
        names = list(data["atom_names"])
        types = np.asarray(data["atom_types"], dtype=np.int64)
        coords = np.asarray(data["coords"])
        cells = np.asarray(data["cells"])
        energies = np.asarray(data["energies"]).reshape(-1)
        forces = np.asarray(data["forces"])
        virials = data.get("virials") if use_virial else None
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise unreadable(path, fmt, exc) from exc
    numbers_by_type = []
    for name in names:
        z = atomic_numbers.get(str(name))
        if z is None:
            raise DataError(
                f"atom type name {name!r} is not a chemical element",
                source=path,
                hint="for deepmd/npy add a type_map.raw with element symbols (one per line)",
                reason="unknown element",
            )
        numbers_by_type.append(z)
    numbers = np.asarray(numbers_by_type, dtype=np.int64)[types]
    nf = coords.shape[0]
    for arr_name, arr in (("energies", energies), ("forces", forces), ("cells", cells)):
        if arr.shape[0] != nf:
            raise DataError(
                f"{arr_name} hold {arr.shape[0]} frames but coordinates hold {nf}",
                source=path,
                hint="the data set is inconsistent; regenerate it",
                reason="shape mismatch",
            )
    nopbc = bool(data.get("nopbc", False))
    pbc = np.full(3, not nopbc)
    for k in range(nf):
        virial = None if virials is None else np.asarray(virials[k], dtype=np.float64)
        yield Frame(
            positions=coords[k],
            cell=cells[k],
            pbc=pbc,
            numbers=numbers,
            energy=float(energies[k]),
            forces=forces[k],
            virial=virial,
            source=str(path),
            index=k,
        )
