"""Which files to read and with which backend: path expansion and ``fmt`` resolution."""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlekf.data.frames import DataError, PathLike

__all__ = ["ASE_ALIASES", "expand_paths", "natural_key", "resolve_format"]

#: ``fmt`` aliases mapped to ASE format names.
ASE_ALIASES: dict[str, str] = {
    "vasp/outcar": "vasp-out",
    "outcar": "vasp-out",
    "vasp/xml": "vasp-xml",
    "vasp/vasprun": "vasp-xml",
    "vasprun": "vasp-xml",
    "xyz": "extxyz",
}


def natural_key(text: str) -> list[Any]:
    """Sort key ordering embedded numbers numerically (``data_2`` before ``data_10``)."""
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


def expand_paths(path: PathLike | Sequence[PathLike]) -> list[Path]:
    """Turn a path, glob pattern or list of them into existing paths, or raise DataError.

    Glob matches are sorted by :func:`natural_key`; the order of a list is kept.
    """
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise DataError("empty list of data paths", hint="give at least one file or directory")
    out: list[Path] = []
    for item in items:
        text = os.fspath(item)
        p = Path(text).expanduser()
        if p.exists():
            out.append(p)
            continue
        if any(c in text for c in "*?["):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True), key=natural_key)
            if not matches:
                raise DataError(
                    "glob pattern matches no files",
                    source=text,
                    hint=f"check the pattern (relative to the working directory {os.getcwd()})",
                    reason="missing file",
                )
            out.extend(Path(m) for m in matches)
            continue
        raise DataError(
            "file or directory not found",
            source=text,
            hint=f"check the path (relative paths resolve against {os.getcwd()})",
            reason="missing file",
        )
    return out


def resolve_format(path: PathLike, fmt: str = "auto") -> tuple[str, str | None]:
    """Resolve ``fmt`` for ``path`` into a reader backend and format name.

    Args:
        path: File or directory.
        fmt: Requested format (see :func:`rlekf.data.readers.read_frames`).

    Returns:
        ``(backend, name)`` where backend is ``"deepmd"``, ``"dpdata"`` or ``"ase"`` and name is
        the dpdata/ASE format (``None``: let ASE guess).
    """
    p = Path(path)
    f = fmt.strip()
    low = f.lower()
    if low == "auto":
        if p.is_dir():
            return "deepmd", "deepmd/npy"
        name = p.name
        if "MOVEMENT" in name.upper():
            return "dpdata", "pwmat/movement"
        if name.upper().startswith("OUTCAR"):
            return "ase", "vasp-out"
        if name.lower().startswith("vasprun") and name.lower().endswith(".xml"):
            return "ase", "vasp-xml"
        if name.lower().endswith((".xyz", ".extxyz")):
            return "ase", "extxyz"
        return "ase", None
    if low in ("deepmd/npy", "deepmd", "deepmd/raw-npy", "dpdata:deepmd/npy"):
        return "deepmd", "deepmd/npy"
    if low in ("pwmat/movement", "movement", "pwmat/mlmd"):
        return "dpdata", "pwmat/movement"
    if low.startswith("dpdata:"):
        return "dpdata", f.split(":", 1)[1]
    if low.startswith("ase:"):
        f = f.split(":", 1)[1]
        low = f.lower()
    return "ase", ASE_ALIASES.get(low, f)
