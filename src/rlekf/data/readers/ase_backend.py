"""ASE backend: extxyz, VASP OUTCAR/vasprun.xml and any other :func:`ase.io.iread` format."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from rlekf.data.frames import DataError, Frame, unreadable

__all__ = ["iter_ase"]


def iter_ase(path: Path, fmt: str | None, use_virial: bool) -> Iterator[Frame | DataError]:
    """Yield the frames of ``path`` read with ASE (not yet validated).

    A file that fails before its first frame raises :class:`DataError`; a parse error after
    ``k`` frames is yielded as a :class:`DataError` naming frame ``k`` (a truncated file), and
    so is a frame without energy or forces.

    Args:
        path: The file.
        fmt: ASE format name (``None``: let ASE guess).
        use_virial: Whether to read the stress (or ``info["virial"]``) as the virial.
    """
    import ase.io

    try:
        it = ase.io.iread(str(path), index=":", format=fmt)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes a DataError
        raise unreadable(path, fmt, exc) from exc
    k = 0
    while True:
        try:
            atoms = next(it)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001
            if k == 0:
                raise unreadable(path, fmt, exc) from exc
            yield DataError(
                f"could not read {path} as {fmt or 'auto-detected format'} from frame {k} on "
                f"({k} frame(s) before it were read; the file is probably truncated): "
                f"{type(exc).__name__}: {exc}",
                source=path,
                index=k,
                hint="regenerate the file or cut it after the last complete frame; with "
                "on_error='skip' the unreadable tail is dropped",
                reason="unreadable tail",
            )
            return
        try:
            yield Frame.from_atoms(atoms, path, k, use_virial=use_virial)
        except DataError as exc:
            yield exc
        k += 1
