"""Batch keys: every batch is a ``dict[str, Tensor]`` addressed through these constants.

This module imports nothing, so models, data, training and tools can all use it without
loading each other (``rlekf.data.keys`` re-exports it).

Shapes use ``B`` frames, ``N`` atoms in the batch (all frames concatenated) and ``M``
neighbour slots per atom (``M = sum(sel)``). Units: Å, eV, eV/Å.
"""

from typing import Final

__all__ = [
    "POSITIONS",
    "CELL",
    "PBC",
    "NUMBERS",
    "TYPES",
    "BATCH",
    "N_ATOMS",
    "ENERGY",
    "FORCES",
    "VIRIAL",
    "HAS_VIRIAL",
    "NEIGHBORS",
    "SHIFTS",
    "FRAME_ID",
    "ATOM_ENERGY",
    "MAX_COUNT",
]

POSITIONS: Final[str] = "positions"  # (N, 3) float, Å, Cartesian
CELL: Final[str] = "cell"  # (B, 3, 3) float, Å, rows are lattice vectors
PBC: Final[str] = "pbc"  # (B, 3) bool
NUMBERS: Final[str] = "numbers"  # (N,) int64 atomic numbers
TYPES: Final[str] = "types"  # (N,) int64 index into the type map
BATCH: Final[str] = "batch"  # (N,) int64 frame index of each atom
N_ATOMS: Final[str] = "n_atoms"  # (B,) int64 atoms per frame
ENERGY: Final[str] = "energy"  # (B,) float, eV, total potential energy of the frame
FORCES: Final[str] = "forces"  # (N, 3) float, eV/Å
VIRIAL: Final[str] = "virial"  # (B, 3, 3) float, eV (DeePMD convention: -stress * volume)
HAS_VIRIAL: Final[str] = "has_virial"  # (B,) bool: virial label present for this frame
NEIGHBORS: Final[str] = "neighbors"  # (N, M) int64 global atom index, -1 for an empty slot
SHIFTS: Final[str] = "shifts"  # (N, M, 3) float, integer cell shifts of each neighbour
FRAME_ID: Final[str] = "frame_id"  # (B,) int64 index of the frame in its data set

# model outputs besides ENERGY, FORCES, VIRIAL
ATOM_ENERGY: Final[str] = "atom_energy"  # (N,) float64, eV, energy of each atom

# bookkeeping inside the data pipeline (not in a collated batch)
MAX_COUNT: Final[str] = "_max_count"  # (ntypes,) int64 most neighbours of each type in a frame
