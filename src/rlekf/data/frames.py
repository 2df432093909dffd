"""Labelled frames and the errors that name the file and frame they come from.

A :class:`Frame` holds one configuration in the convention of every reader: lengths in Å,
energies in eV, forces in eV/Å, ``cell`` rows are lattice vectors (zeros allowed along
non-periodic directions), ``virial`` in eV with DeePMD's sign (``-stress * volume``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SKIP_HINT", "DataError", "DataWarning", "Frame", "PathLike", "unreadable"]

PathLike = str | os.PathLike

#: Hint appended to the message of a frame-level problem.
SKIP_HINT = "fix or remove it, or read with on_error='skip' to drop such frames"


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


def unreadable(path: PathLike, fmt: str | None, exc: BaseException) -> DataError:
    """The :class:`DataError` for a file a backend failed to parse (``fmt=None``: guessed)."""
    shown = fmt or "auto-detected format"
    return DataError(
        f"could not read {path} as {shown}: {type(exc).__name__}: {exc}",
        source=path,
        hint="check that the file is complete and pass the right fmt= "
        "('extxyz', 'pwmat/movement', 'deepmd/npy', 'vasp/outcar', ...)",
        reason="unreadable file",
    )


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
            The frame (not yet validated; see :func:`rlekf.data.readers.validate_frame`).

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
            hint=f"every training frame needs energy and forces; {SKIP_HINT}",
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
                hint=f"store the full 3x3 virial or read with use_virial=False; {SKIP_HINT}",
                reason="bad virial shape",
            )
        return virial.reshape(3, 3)
    return None
