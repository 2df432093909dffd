"""DeePMD system directories (``type.raw`` + ``set.*/``): discovery and array-size checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rlekf.data.frames import DataError, unreadable
from rlekf.data.readers.resolve import natural_key

__all__ = ["check_deepmd_dir", "deepmd_systems"]


def deepmd_systems(path: Path) -> list[Path]:
    """``[path]`` if it is a deepmd/npy system, else its system sub-directories (natural order).

    Raises:
        DataError: Neither ``path`` nor any sub-directory holds a ``type.raw``.
    """
    if (path / "type.raw").is_file():
        return [path]
    systems = sorted(
        (p.parent for p in path.rglob("type.raw") if p.is_file()),
        key=lambda p: natural_key(str(p)),
    )
    if not systems:
        raise DataError(
            "is not a deepmd/npy system: no type.raw in it or in any sub-directory",
            source=path,
            hint="pass a DeePMD system directory (type.raw + set.*/) or choose another fmt",
            reason="unreadable file",
        )
    return systems


def check_deepmd_dir(path: Path) -> None:
    """Check the array sizes of a deepmd/npy system before dpdata reshapes them.

    Every ``set.*`` needs ``energy``, ``coord``, ``force`` and (unless ``nopbc``) ``box``
    arrays whose sizes agree with the frame count of ``energy.npy`` and the atom count of
    ``type.raw``; ``virial.npy`` is optional.

    Raises:
        DataError: Naming the system, the set and the mismatch.
    """
    hint = "the data set is inconsistent; regenerate it (e.g. with dpdata) or remove the set"
    try:
        n_atoms = len((path / "type.raw").read_text().split())
    except OSError as exc:
        raise unreadable(path, "deepmd/npy", exc) from exc
    if n_atoms == 0:
        raise DataError("type.raw is empty (0 atoms)", source=path, hint=hint, reason="no atoms")
    sets = sorted((p for p in path.glob("set.*") if p.is_dir()), key=lambda p: p.name)
    if not sets:
        raise DataError(
            "deepmd/npy system has no set.* directories",
            source=path,
            hint="each system needs set.000/ with coord.npy, box.npy, energy.npy, force.npy",
            reason="no frames",
        )
    nopbc = (path / "nopbc").is_file()
    for s in sets:
        sizes: dict[str, int] = {}
        for key in ("energy", "coord", "force", "box", "virial"):
            f = s / f"{key}.npy"
            if not f.is_file():
                if key == "virial" or (key == "box" and nopbc):
                    continue
                raise DataError(
                    f"{key}.npy is missing in {s.name}",
                    source=path,
                    hint=hint,
                    reason="missing file",
                )
            try:
                sizes[key] = int(np.load(f, mmap_mode="r").size)
            except Exception as exc:  # noqa: BLE001
                raise unreadable(f, "npy", exc) from exc
        nf = sizes["energy"]
        expected = {
            "coord": nf * n_atoms * 3,
            "force": nf * n_atoms * 3,
            "box": nf * 9,
            "virial": nf * 9,
        }
        for key, size in sizes.items():
            if key in expected and size != expected[key]:
                raise DataError(
                    f"{s.name}/{key}.npy holds {size} values but {nf} frames "
                    f"(energy.npy) x {n_atoms} atoms (type.raw) need {expected[key]}: "
                    "atom counts or frame counts do not match",
                    source=path,
                    hint=hint,
                    reason="shape mismatch",
                )
