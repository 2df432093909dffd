"""Read labelled DFT frames (positions, cell, energy, forces, virial) from disk.

Every reader returns a list of :class:`Frame` objects in a single convention:

* lengths in Å, energies in eV, forces in eV/Å;
* ``cell`` rows are lattice vectors (zeros are allowed along non-periodic directions);
* ``virial`` in eV, DeePMD convention ``virial = -stress * volume`` (positive under compression).

Supported inputs (``fmt``):

* ``"deepmd/npy"``: a DeePMD system directory (holding ``type.raw``) or a directory whose
  sub-directories are such systems, read in natural sort order (``data_0``, ``data_1``, ...).
* ``"pwmat/movement"``: a PWmat ``MOVEMENT`` file (through dpdata). PWmat virials can be wrong
  (the Cu example implies about +136 GPa); read them with ``use_virial=False``.
* ``"dpdata:<fmt>"``: any other dpdata ``LabeledSystem`` format.
* ``"extxyz"``, ``"vasp/outcar"``, ``"vasp/xml"`` or any ASE format name (``"ase:"`` prefix
  optional), read with :func:`ase.io.iread`.
* ``"auto"``: a directory is deepmd/npy, a file whose name contains ``MOVEMENT`` is PWmat,
  ``OUTCAR*`` / ``vasprun*.xml`` are VASP, ``*.xyz`` / ``*.extxyz`` are extxyz, and anything else
  is left to ASE's file-type detection.

Every frame is checked by :func:`validate_frame`; problems raise :class:`DataError` (a
``ValueError``) naming the file and frame, or, with ``on_error="skip"``, are counted in a
:class:`ReadReport` and summarised in one warning.
"""

from __future__ import annotations

import glob
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MIN_DISTANCE",
    "DataError",
    "DataWarning",
    "Frame",
    "ReadReport",
    "SkippedFrame",
    "apply_type_map",
    "read_frames",
    "read_frames_with_report",
    "resolve_format",
    "type_map_from_frames",
    "validate_frame",
]

PathLike = str | os.PathLike

#: Minimum allowed interatomic distance in Å (periodic images included).
MIN_DISTANCE: float = 0.3

#: Neighbour-search radius (Å) used to find pairs closer than ``MIN_DISTANCE`` quickly.
_SEARCH_CUTOFF: float = 1.5

_SKIP_HINT = "fix or remove it, or read with on_error='skip' to drop such frames"

#: ``fmt`` aliases mapped to ASE format names.
_ASE_ALIASES: dict[str, str] = {
    "vasp/outcar": "vasp-out",
    "outcar": "vasp-out",
    "vasp/xml": "vasp-xml",
    "vasp/vasprun": "vasp-xml",
    "vasprun": "vasp-xml",
    "xyz": "extxyz",
}


class DataError(ValueError):
    """A data file or frame cannot be used.

    The message names the file, the frame (where relevant), what is wrong and what to do.

    Attributes:
        source: File or directory the problem was found in.
        index: Frame index within ``source`` (``None`` for file-level problems).
        reason: Short category of the problem (used to summarise skipped frames).
    """

    def __init__(
        self,
        what: str,
        *,
        source: PathLike | None = None,
        index: int | None = None,
        hint: str = "",
        reason: str | None = None,
    ) -> None:
        self.source = None if source is None else str(source)
        self.index = index
        self.reason = reason or what
        where = [] if self.source is None else [self.source]
        if index is not None:
            where.append(f"frame {index}")
        message = f"{' '.join(where)}: {what}" if where else what
        if hint:
            message = f"{message}; {hint}"
        super().__init__(message)


class DataWarning(UserWarning):
    """Warning category for skipped frames and regenerated data caches."""


@dataclass(eq=False)
class Frame:
    """One labelled configuration.

    Attributes:
        positions: (n, 3) float64 Cartesian positions in Å.
        cell: (3, 3) float64 cell in Å, rows are lattice vectors (zeros allowed when not
            periodic).
        pbc: (3,) bool periodicity along each lattice vector.
        numbers: (n,) int64 atomic numbers.
        energy: Total potential energy in eV.
        forces: (n, 3) float64 forces in eV/Å.
        virial: (3, 3) float64 virial in eV (``-stress * volume``) or ``None`` if unlabelled.
        source: Path of the file (or system directory) the frame was read from.
        index: Index of the frame within ``source``.
    """

    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    numbers: np.ndarray
    energy: float
    forces: np.ndarray
    virial: np.ndarray | None = None
    source: str = "<memory>"
    index: int = 0

    def __post_init__(self) -> None:
        self.positions = np.asarray(self.positions, dtype=np.float64)
        self.cell = np.asarray(self.cell, dtype=np.float64)
        pbc = np.asarray(self.pbc, dtype=bool)
        self.pbc = np.full(3, bool(pbc)) if pbc.ndim == 0 else pbc
        self.numbers = np.asarray(self.numbers, dtype=np.int64)
        self.energy = float(self.energy)
        self.forces = np.asarray(self.forces, dtype=np.float64)
        if self.virial is not None:
            self.virial = np.asarray(self.virial, dtype=np.float64)
        self.source = str(self.source)
        self.index = int(self.index)

    @property
    def n_atoms(self) -> int:
        """Number of atoms ``n``."""
        return int(self.positions.shape[0])

    @property
    def symbols(self) -> list[str]:
        """Chemical symbols of the ``n`` atoms."""
        from ase.data import chemical_symbols

        return [chemical_symbols[int(z)] for z in self.numbers]

    @property
    def volume(self) -> float:
        """Absolute cell volume in Å^3 (0 for a zero or degenerate cell)."""
        return float(abs(np.linalg.det(self.cell)))

    @property
    def has_virial(self) -> bool:
        """Whether the frame carries a virial label."""
        return self.virial is not None

    def to_atoms(self) -> Any:
        """Convert to :class:`ase.Atoms` carrying a ``SinglePointCalculator``.

        The calculator holds the energy (eV), forces (eV/Å) and, when the frame has a virial
        and a non-zero volume, the stress ``-virial / volume`` (eV/Å^3, Voigt order, symmetrised).

        Returns:
            ase.Atoms: The configuration with its labels.
        """
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator
        from ase.stress import full_3x3_to_voigt_6_stress

        atoms = Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell, pbc=self.pbc)
        results: dict[str, Any] = {"energy": self.energy, "forces": self.forces.copy()}
        volume = self.volume
        if self.virial is not None and volume > 1e-12:
            stress = -0.5 * (self.virial + self.virial.T) / volume
            results["stress"] = full_3x3_to_voigt_6_stress(stress)
        atoms.calc = SinglePointCalculator(atoms, **results)
        return atoms

    @classmethod
    def from_atoms(
        cls, atoms: Any, source: PathLike = "<memory>", index: int = 0, *, use_virial: bool = True
    ) -> Frame:
        """Build a frame from an :class:`ase.Atoms` with attached results.

        The virial is ``-stress * volume`` when the calculator holds a stress, otherwise
        ``atoms.info["virial"]`` (3x3 or 9 values, eV) if present, otherwise ``None``.

        Args:
            atoms: Structure with a calculator (e.g. ``SinglePointCalculator``) holding at least
                energy (eV) and forces (eV/Å).
            source: File the structure came from (for messages and bookkeeping).
            index: Frame index in ``source``.
            use_virial: Whether to read the virial/stress at all.

        Returns:
            The frame (not yet validated; see :func:`validate_frame`).

        Raises:
            DataError: If the energy or the forces are missing or the stress is unusable.
        """
        energy = _atoms_property(atoms, "energy", source, index)
        forces = _atoms_property(atoms, "forces", source, index)
        virial = None
        if use_virial:
            virial = _atoms_virial(atoms, source, index)
        return cls(
            positions=atoms.get_positions(),
            cell=np.asarray(atoms.get_cell()),
            pbc=atoms.get_pbc(),
            numbers=atoms.get_atomic_numbers(),
            energy=energy,
            forces=forces,
            virial=virial,
            source=str(source),
            index=index,
        )


def _atoms_property(atoms: Any, name: str, source: PathLike, index: int) -> Any:
    """Return ``energy`` (float) or ``forces`` (array) of ``atoms`` or raise DataError."""
    from ase.calculators.calculator import PropertyNotImplementedError

    try:
        if name == "energy":
            return atoms.get_potential_energy()
        return atoms.get_forces()
    except (PropertyNotImplementedError, RuntimeError, NotImplementedError) as exc:
        raise DataError(
            f"frame has no {name} label ({type(exc).__name__}: {exc})",
            source=source,
            index=index,
            hint=f"every training frame needs energy and forces; {_SKIP_HINT}",
            reason=f"missing {name}",
        ) from exc


def _atoms_virial(atoms: Any, source: PathLike, index: int) -> np.ndarray | None:
    """Virial (3, 3) eV from the stress or ``info['virial']`` of ``atoms``, else ``None``."""
    calc = atoms.calc
    results = getattr(calc, "results", {}) or {}
    if "stress" in results and results["stress"] is not None:
        stress = np.asarray(atoms.get_stress(voigt=False), dtype=np.float64)
        volume = abs(float(np.linalg.det(np.asarray(atoms.get_cell()))))
        if volume < 1e-12:
            raise DataError(
                "frame has a stress label but its cell has zero volume, so the virial "
                "(-stress * volume) is undefined",
                source=source,
                index=index,
                hint="give the frame a cell or read with use_virial=False",
                reason="stress without volume",
            )
        return -stress * volume
    if "virial" in atoms.info:
        virial = np.asarray(atoms.info["virial"], dtype=np.float64)
        if virial.size != 9:
            raise DataError(
                f"info['virial'] has {virial.size} values, expected 9 (3x3, eV)",
                source=source,
                index=index,
                hint=f"store the full 3x3 virial or read with use_virial=False; {_SKIP_HINT}",
                reason="bad virial shape",
            )
        return virial.reshape(3, 3)
    return None


@dataclass
class SkippedFrame:
    """A frame dropped by ``on_error="skip"``.

    Attributes:
        source: File the frame belongs to.
        index: Frame index in ``source`` (for an unreadable tail: the first unreadable frame).
        reason: Short category of the problem.
        message: Full :class:`DataError` message.
    """

    source: str
    index: int | None
    reason: str
    message: str


@dataclass
class ReadReport:
    """What a call to :func:`read_frames_with_report` read and skipped.

    Attributes:
        files: Files or system directories read, in order.
        frames_per_file: Number of frames kept from each file.
        skipped: Frames dropped with ``on_error="skip"``.
    """

    files: list[str] = field(default_factory=list)
    frames_per_file: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedFrame] = field(default_factory=list)

    @property
    def n_read(self) -> int:
        """Number of frames kept."""
        return sum(self.frames_per_file.values())

    @property
    def n_skipped(self) -> int:
        """Number of frames (or unreadable file tails) skipped."""
        return len(self.skipped)

    def reasons(self) -> Counter[str]:
        """Count skipped frames per reason."""
        return Counter(s.reason for s in self.skipped)

    def summary(self) -> str:
        """One-line human-readable summary of kept and skipped frames."""
        text = f"read {self.n_read} frames from {len(self.files)} file(s)"
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.reasons().most_common())
            first = self.skipped[0].message
            text += f", skipped {self.n_skipped} ({reasons}); first: {first}"
        return text


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def read_frames(
    path: PathLike | Sequence[PathLike],
    fmt: str = "auto",
    *,
    use_virial: bool = True,
    on_error: str = "raise",
) -> list[Frame]:
    """Read and validate labelled frames from one or more files.

    Args:
        path: A file, a deepmd/npy directory, a glob pattern, or a list of these (read in order
            and concatenated; glob matches are sorted naturally).
        fmt: ``"auto"``, ``"deepmd/npy"``, ``"pwmat/movement"``, ``"vasp/outcar"``,
            ``"vasp/xml"``, ``"extxyz"``, ``"dpdata:<fmt>"`` or any ASE format name (optionally
            prefixed ``"ase:"``). Applies to every path.
        use_virial: If False, every frame's ``virial`` is ``None`` (e.g. for PWmat Cu, whose
            virials are unphysical).
        on_error: ``"raise"`` raises :class:`DataError` on the first bad frame; ``"skip"`` drops
            bad frames, counts them in the report and emits one :class:`DataWarning`.
            File-level problems (missing, empty, unreadable file) always raise.

    Returns:
        The frames, in file order.

    Raises:
        DataError: Missing/empty/unreadable file, no frames, or an invalid frame
            (with ``on_error="raise"``).
    """
    frames, _ = read_frames_with_report(path, fmt, use_virial=use_virial, on_error=on_error)
    return frames


def read_frames_with_report(
    path: PathLike | Sequence[PathLike],
    fmt: str = "auto",
    *,
    use_virial: bool = True,
    on_error: str = "raise",
) -> tuple[list[Frame], ReadReport]:
    """Like :func:`read_frames` but also return a :class:`ReadReport`.

    Args:
        path: See :func:`read_frames`.
        fmt: See :func:`read_frames`.
        use_virial: See :func:`read_frames`.
        on_error: See :func:`read_frames`.

    Returns:
        ``(frames, report)``.

    Raises:
        DataError: See :func:`read_frames`.
        ValueError: If ``on_error`` is neither ``"raise"`` nor ``"skip"``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = ReadReport()
    frames: list[Frame] = []
    for p in _expand_paths(path):
        frames.extend(_read_path(p, fmt, use_virial, on_error, report))
    if report.skipped:
        warnings.warn(report.summary(), DataWarning, stacklevel=3)
    return frames, report


def resolve_format(path: PathLike, fmt: str = "auto") -> tuple[str, str | None]:
    """Resolve ``fmt`` for ``path`` into a reader backend and format name.

    Args:
        path: File or directory.
        fmt: Requested format (see :func:`read_frames`).

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
    return "ase", _ASE_ALIASES.get(low, f)


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

    def fail(what: str, reason: str, hint: str = _SKIP_HINT) -> DataError:
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


def type_map_from_frames(frames: Sequence[Frame]) -> list[str]:
    """Sorted (alphabetically) unique element symbols found in ``frames``.

    Args:
        frames: Frames to scan.

    Returns:
        For example ``["H", "O"]`` for water.
    """
    from ase.data import chemical_symbols

    zs: set[int] = set()
    for fr in frames:
        zs.update(int(z) for z in np.unique(fr.numbers))
    return sorted(chemical_symbols[z] for z in zs)


def apply_type_map(
    numbers: np.ndarray | Sequence[int],
    type_map: Sequence[str],
    source: PathLike = "<memory>",
    index: int | None = None,
) -> np.ndarray:
    """Map atomic numbers to indices into ``type_map``.

    Args:
        numbers: (n,) atomic numbers.
        type_map: Element symbols; type ``t`` is ``type_map[t]``.
        source: File the atoms came from (for the error message).
        index: Frame index in ``source`` (for the error message).

    Returns:
        (n,) int64 type indices.

    Raises:
        DataError: If an element is not in ``type_map``.
    """
    from ase.data import atomic_numbers, chemical_symbols

    numbers = np.asarray(numbers, dtype=np.int64)
    lookup = np.full(119, -1, dtype=np.int64)
    for t, sym in enumerate(type_map):
        z = atomic_numbers.get(sym)
        if z is None:
            raise DataError(
                f"type_map entry {sym!r} is not a chemical element (type_map {list(type_map)})",
                source=source,
                index=index,
                hint="use element symbols such as 'Cu' or 'O' in model.type_map",
                reason="bad type_map",
            )
        if lookup[z] < 0:
            lookup[z] = t
    safe = np.clip(numbers, 0, 118)
    types = lookup[safe]
    missing = (types < 0) | (numbers != safe)
    if missing.any():
        z = int(numbers[np.flatnonzero(missing)[0]])
        sym = chemical_symbols[z] if 0 < z <= 118 else f"Z={z}"
        where = str(source) if index is None else f"{source} frame {index}"
        raise DataError(
            f"element {sym} in {where} is not in type_map {list(type_map)}; "
            "add it to model.type_map",
            reason="element not in type_map",
        )
    return types


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _natural_key(text: str) -> list[Any]:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", text)]


def _expand_paths(path: PathLike | Sequence[PathLike]) -> list[Path]:
    """Turn a path, glob pattern or list of them into existing paths, or raise DataError."""
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
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True), key=_natural_key)
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


def _read_path(
    path: Path, fmt: str, use_virial: bool, on_error: str, report: ReadReport
) -> list[Frame]:
    """Read and validate all frames of one path, recording results in ``report``."""
    backend, name = resolve_format(path, fmt)
    if path.is_dir() and backend != "deepmd":
        raise DataError(
            f"is a directory but format {fmt!r} expects a file",
            source=path,
            hint="use fmt='deepmd/npy' for DeePMD system directories or pass the file itself",
            reason="unreadable file",
        )
    if backend == "deepmd":
        if not path.is_dir():
            raise DataError(
                "deepmd/npy data must be a directory holding type.raw and set.* folders",
                source=path,
                hint="pass the system directory (or its parent), or choose another fmt",
                reason="unreadable file",
            )
        systems = _deepmd_systems(path)
        frames: list[Frame] = []
        for sysdir in systems:
            frames.extend(
                _collect(_iter_dpdata(sysdir, "deepmd/npy", use_virial), sysdir, on_error, report)
            )
        return frames
    if path.stat().st_size == 0:
        raise DataError(
            "file is empty (0 bytes)",
            source=path,
            hint="the file was probably not written completely; regenerate or remove it",
            reason="empty file",
        )
    if backend == "dpdata":
        assert name is not None
        return _collect(_iter_dpdata(path, name, use_virial), path, on_error, report)
    return _collect(_iter_ase(path, name, use_virial), path, on_error, report)


def _collect(
    items: Iterator[Frame | DataError], source: Path, on_error: str, report: ReadReport
) -> list[Frame]:
    """Validate frames from ``items``; raise or record errors according to ``on_error``."""
    frames: list[Frame] = []
    seen = 0
    for item in items:
        seen += 1
        err = item if isinstance(item, DataError) else None
        if err is None:
            assert isinstance(item, Frame)
            try:
                validate_frame(item)
            except DataError as exc:
                err = exc
        if err is not None:
            if on_error == "raise" or err.index is None:
                raise err
            report.skipped.append(SkippedFrame(str(source), err.index, err.reason, str(err)))
            continue
        frames.append(item)  # type: ignore[arg-type]
    if seen == 0:
        raise DataError(
            "contains no frames",
            source=source,
            hint="check that the file is complete and that fmt is right",
            reason="no frames",
        )
    report.files.append(str(source))
    report.frames_per_file[str(source)] = len(frames)
    return frames


def _unreadable(path: PathLike, fmt: str | None, exc: BaseException) -> DataError:
    shown = fmt or "auto-detected format"
    return DataError(
        f"could not read {path} as {shown}: {type(exc).__name__}: {exc}",
        source=path,
        hint="check that the file is complete and pass the right fmt= "
        "('extxyz', 'pwmat/movement', 'deepmd/npy', 'vasp/outcar', ...)",
        reason="unreadable file",
    )


def _iter_ase(path: Path, fmt: str | None, use_virial: bool) -> Iterator[Frame | DataError]:
    """Yield frames read with ASE; a parse error after k frames names frame k."""
    import ase.io

    try:
        it = ase.io.iread(str(path), index=":", format=fmt)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes a DataError
        raise _unreadable(path, fmt, exc) from exc
    k = 0
    while True:
        try:
            atoms = next(it)
        except StopIteration:
            return
        except Exception as exc:  # noqa: BLE001
            if k == 0:
                raise _unreadable(path, fmt, exc) from exc
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


def _iter_dpdata(path: Path, fmt: str, use_virial: bool) -> Iterator[Frame | DataError]:
    """Yield frames of a dpdata ``LabeledSystem``."""
    from ase.data import atomic_numbers

    if fmt == "deepmd/npy":
        _check_deepmd_dir(path)
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
        raise _unreadable(path, fmt, exc) from exc
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


def _deepmd_systems(path: Path) -> list[Path]:
    """Return ``[path]`` if it is a deepmd/npy system, else its system sub-directories."""
    if (path / "type.raw").is_file():
        return [path]
    systems = sorted(
        (p.parent for p in path.rglob("type.raw") if p.is_file()),
        key=lambda p: _natural_key(str(p)),
    )
    if not systems:
        raise DataError(
            "is not a deepmd/npy system: no type.raw in it or in any sub-directory",
            source=path,
            hint="pass a DeePMD system directory (type.raw + set.*/) or choose another fmt",
            reason="unreadable file",
        )
    return systems


def _check_deepmd_dir(path: Path) -> None:
    """Check the array sizes of a deepmd/npy system before dpdata reshapes them."""
    hint = "the data set is inconsistent; regenerate it (e.g. with dpdata) or remove the set"
    try:
        n_atoms = len((path / "type.raw").read_text().split())
    except OSError as exc:
        raise _unreadable(path, "deepmd/npy", exc) from exc
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
                raise _unreadable(f, "npy", exc) from exc
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


def _check_min_distance(frame: Frame, cutoff: float, fail: Any) -> None:
    """Raise ``fail(...)`` if any pair (periodic images included) is closer than ``cutoff``."""
    n = frame.n_atoms
    if n < 2 and not frame.pbc.any():
        return
    pos = frame.positions
    pbc = frame.pbc
    # A cell list with a 0.3 Å cutoff has very many cells and is slow; search a larger sphere
    # (few extra pairs) and filter.
    search = max(cutoff, _SEARCH_CUTOFF)
    try:
        from vesin import NeighborList

        # vesin needs a non-degenerate box only along periodic directions; a fully
        # non-periodic frame gets a zero box.
        periodic: Any = pbc.tolist() if pbc.any() else False
        box = frame.cell if pbc.any() else np.zeros((3, 3))
        nl = NeighborList(cutoff=search, full_list=False)
        i, j, shifts, dist = nl.compute(pos, box, periodic, quantities="ijSd")
    except ImportError:
        from ase import Atoms
        from ase.neighborlist import neighbor_list

        atoms = Atoms(positions=pos, cell=frame.cell, pbc=pbc)
        i, j, shifts, dist = neighbor_list("ijSd", atoms, search, self_interaction=False)
    close = np.asarray(dist) < cutoff
    if not close.any():
        return
    i, j, shifts, dist = (np.asarray(x)[close] for x in (i, j, shifts, dist))
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
        hint="this usually means a corrupt structure, wrong units or a wrong cell; " + _SKIP_HINT,
    )
