"""From structures to model inputs: element types and the se_e2_a neighbour slots, as tensors.

:class:`AtomsConverter` (schnetpack's ``AtomsConverter``) is the one conversion shared by the
data set (:func:`rlekf.data.dataset.frame_to_item`, through :meth:`AtomsConverter.inputs`) and
the ASE calculator (:class:`rlekf.calculator.DPCalculator`, through calling it on an
``ase.Atoms``). The type mapping (atomic number -> index into the model's ``type_map``) is
:func:`type_lookup` + :func:`apply_type_map`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from rlekf import keys as K
from rlekf.data.frames import DataError, Frame, PathLike
from rlekf.data.neighbors import NeighborOverflowError, SlotNeighbors, slot_neighbors

__all__ = [
    "AtomsConverter",
    "UnknownElementError",
    "apply_type_map",
    "type_lookup",
    "type_map_from_frames",
]

#: Largest atomic number (Og).
_MAX_Z = 118


class UnknownElementError(DataError):
    """The structure holds an element that is not in the model's type map.

    Attributes:
        elements: The missing element symbols, sorted.
    """

    def __init__(self, what: str, *, elements: Sequence[str] = (), **kwargs: Any) -> None:
        super().__init__(what, **kwargs)
        self.elements = list(elements)


def _symbol(z: int) -> str:
    from ase.data import chemical_symbols

    return chemical_symbols[z] if 0 < z <= _MAX_Z else f"Z={z}"


def type_lookup(
    type_map: Sequence[str], source: PathLike = "<memory>", index: int | None = None
) -> np.ndarray:
    """Table from atomic number to type index.

    Args:
        type_map: Element symbols; type ``t`` is ``type_map[t]`` (a repeated symbol keeps its
            first type).
        source: File the atoms come from (for the error message).
        index: Frame index in ``source`` (for the error message).

    Returns:
        (119,) int64: entry ``Z`` is the type of element ``Z``, -1 if it is not in ``type_map``.

    Raises:
        DataError: If an entry of ``type_map`` is not a chemical element.
    """
    from ase.data import atomic_numbers

    lookup = np.full(_MAX_Z + 1, -1, dtype=np.int64)
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
    return lookup


def _map(numbers: np.ndarray, lookup: np.ndarray) -> np.ndarray:
    """(n,) type indices of ``numbers``, -1 where the element has no type (or Z is not real)."""
    safe = np.clip(numbers, 0, _MAX_Z)
    types = lookup[safe]
    types[numbers != safe] = -1
    return types


def _types(
    numbers: np.ndarray | Sequence[int],
    lookup: np.ndarray,
    type_map: Sequence[str],
    source: PathLike,
    index: int | None,
) -> np.ndarray:
    numbers = np.asarray(numbers, dtype=np.int64)
    types = _map(numbers, lookup)
    missing = types < 0
    if missing.any():
        sym = _symbol(int(numbers[np.flatnonzero(missing)[0]]))
        where = str(source) if index is None else f"{source} frame {index}"
        raise UnknownElementError(
            f"element {sym} in {where} is not in type_map {list(type_map)}; "
            "add it to model.type_map",
            elements=sorted({_symbol(int(z)) for z in numbers[missing]}),
            reason="element not in type_map",
        )
    return types


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
        UnknownElementError: If an element is not in ``type_map`` (a :class:`DataError`).
        DataError: If an entry of ``type_map`` is not a chemical element.
    """
    return _types(numbers, type_lookup(type_map, source, index), type_map, source, index)


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


class AtomsConverter:
    """Structures to the inputs of a Deep Potential with this type map, cutoff and ``sel``.

    :meth:`inputs` gives one frame's inputs stored compactly (the items of
    :class:`rlekf.data.dataset.AtomsDataset`); calling the converter on an ``ase.Atoms`` gives
    a one-frame batch on ``device`` for a trained model (what :class:`DPCalculator` evaluates).

    Args:
        type_map: Element symbols in type order.
        rcut: Cutoff in Å.
        sel: Neighbour slots per type.
        dtype: Float dtype of positions, cell (and, in a batch, cell shifts).
        device: Device of the batches made by :meth:`__call__`.

    Raises:
        DataError: An entry of ``type_map`` is not a chemical element.
    """

    def __init__(
        self,
        type_map: Sequence[str],
        rcut: float,
        sel: Sequence[int],
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> None:
        self.type_map = list(type_map)
        self.rcut = float(rcut)
        self.sel = [int(s) for s in sel]
        self.dtype = dtype
        self.device = torch.device(device)
        self.lookup = type_lookup(self.type_map)

    def types(
        self,
        numbers: np.ndarray | Sequence[int],
        source: PathLike = "<memory>",
        index: int | None = None,
    ) -> np.ndarray:
        """(n,) int64 type indices of atomic ``numbers`` (see :func:`apply_type_map`).

        Raises:
            UnknownElementError: An element is not in the type map; the message names
                ``source`` and frame ``index``.
        """
        return _types(numbers, self.lookup, self.type_map, source, index)

    def neighbors(
        self,
        positions: np.ndarray,
        cell: np.ndarray,
        pbc: np.ndarray,
        types: np.ndarray,
        where: str = "",
    ) -> SlotNeighbors:
        """The slot neighbour list of one frame (:func:`rlekf.data.neighbors.slot_neighbors`).

        Raises:
            NeighborOverflowError: An atom has more neighbours of a type than ``sel`` slots;
                the message starts with ``where``.
        """
        return slot_neighbors(positions, cell, pbc, types, self.rcut, self.sel, where=where)

    def inputs(
        self,
        positions: np.ndarray,
        cell: np.ndarray,
        pbc: np.ndarray,
        numbers: np.ndarray,
        *,
        source: PathLike = "<memory>",
        index: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """One frame's model inputs, on the CPU, for a data set item.

        Args:
            positions: (n, 3) Å.
            cell: (3, 3) Å, rows are lattice vectors.
            pbc: (3,) bool.
            numbers: (n,) atomic numbers.
            source: File of the frame (for error messages).
            index: Frame index in ``source`` (for error messages).

        Returns:
            ``POSITIONS`` (n, 3) and ``CELL`` (1, 3, 3) in ``dtype``; ``PBC`` (1, 3) bool;
            ``NUMBERS``, ``TYPES`` (n,) and ``N_ATOMS`` (1,) int64; ``NEIGHBORS`` (n, M) int32
            (local indices, -1 empty); ``SHIFTS`` (n, M, 3) int16; ``MAX_COUNT`` (ntypes,)
            int64, the largest neighbour count of each type.

        Raises:
            UnknownElementError: An element is not in the type map.
            NeighborOverflowError: More neighbours than ``sel`` allows.
        """
        types = self.types(numbers, source, index)
        where = f"{source} frame {index}"
        nl = self.neighbors(positions, cell, pbc, types, where)
        return {
            K.POSITIONS: torch.as_tensor(positions, dtype=self.dtype),
            K.CELL: torch.as_tensor(cell, dtype=self.dtype).reshape(1, 3, 3),
            K.PBC: torch.as_tensor(np.asarray(pbc, dtype=bool)).reshape(1, 3),
            K.NUMBERS: torch.as_tensor(numbers, dtype=torch.int64),
            K.TYPES: torch.as_tensor(types, dtype=torch.int64),
            K.N_ATOMS: torch.tensor([len(types)], dtype=torch.int64),
            K.NEIGHBORS: torch.as_tensor(nl.neighbors, dtype=torch.int32),
            K.SHIFTS: torch.as_tensor(nl.shifts, dtype=torch.int16),
            K.MAX_COUNT: torch.as_tensor(nl.max_count),
        }

    def __call__(self, atoms: Any) -> dict[str, torch.Tensor]:
        """A one-frame batch of ``atoms`` for the trained model, on ``device``.

        Args:
            atoms: An ``ase.Atoms``.

        Returns:
            ``POSITIONS`` (n, 3), ``CELL`` (1, 3, 3) and ``SHIFTS`` (n, M, 3) in ``dtype``;
            ``TYPES`` (n,), ``BATCH`` (n,) zeros and ``NEIGHBORS`` (n, M) int64.

        Raises:
            UnknownElementError: An element is not in the model's type map.
            NeighborOverflowError: An atom has more neighbours of a type than ``sel`` slots.
        """
        numbers = atoms.get_atomic_numbers().astype(np.int64)
        types = _map(numbers, self.lookup)
        bad = np.flatnonzero(types < 0)
        if bad.size:
            missing = sorted({_symbol(int(z)) for z in numbers[bad]})
            raise UnknownElementError(
                f"element(s) {', '.join(missing)} not in the model's type map {self.type_map}: "
                "the model was trained only on these elements; use a model trained with "
                f"{', '.join(missing)} or remove those atoms",
                elements=missing,
                reason="element not in type_map",
            )
        positions = atoms.get_positions()
        cell = np.asarray(atoms.get_cell())
        try:
            nl = self.neighbors(
                positions, cell, atoms.get_pbc(), types, where=atoms.get_chemical_formula()
            )
        except NeighborOverflowError as exc:
            raise NeighborOverflowError(
                f"{exc}. A trained model's sel is fixed: this structure is denser than the "
                "model allows (compressed or collapsed?); check it, or train a model with a "
                "larger sel"
            ) from exc
        dev, dt = self.device, self.dtype
        return {
            K.POSITIONS: torch.as_tensor(positions, dtype=dt, device=dev),
            K.CELL: torch.as_tensor(cell, dtype=dt, device=dev).reshape(1, 3, 3),
            K.TYPES: torch.as_tensor(types, dtype=torch.int64, device=dev),
            K.BATCH: torch.zeros(len(types), dtype=torch.int64, device=dev),
            K.NEIGHBORS: torch.as_tensor(nl.neighbors, dtype=torch.int64, device=dev),
            K.SHIFTS: torch.as_tensor(nl.shifts, dtype=dt, device=dev),
        }
