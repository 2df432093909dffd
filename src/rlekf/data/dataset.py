"""In-memory data set of labelled frames with precomputed neighbour lists, and its batching.

Neighbour lists are computed once per frame when the data set is built (with vesin) and kept
with the frame; positions never change during training, so they stay valid. Each item is a
``dict[str, Tensor]`` keyed by :mod:`rlekf.data.keys`; :func:`collate_atoms` concatenates
frames of any atom counts into one batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from rlekf import keys as K
from rlekf.data.converter import AtomsConverter
from rlekf.data.frames import DataError, Frame

__all__ = ["AtomsDataset", "GroupedBatchSampler", "collate_atoms", "frame_to_item"]


def frame_to_item(
    frame: Frame,
    type_map: Sequence[str],
    rcut: float,
    sel: Sequence[int],
    frame_id: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Convert one :class:`Frame` into a single-frame item with its neighbour list.

    Positions and cell are in ``dtype``; energy, force and virial labels are always float64.

    Raises:
        DataError: element not in the type map, or more neighbours than ``sel`` allows.
    """
    return _item(AtomsConverter(type_map, rcut, sel, dtype), frame, frame_id)


def _item(converter: AtomsConverter, frame: Frame, frame_id: int) -> dict[str, torch.Tensor]:
    """The inputs of ``frame`` (:meth:`AtomsConverter.inputs`) with its labels and id."""
    try:
        x = converter.inputs(
            frame.positions,
            frame.cell,
            frame.pbc,
            frame.numbers,
            source=frame.source,
            index=frame.index,
        )
    except DataError:
        raise
    except ValueError as exc:  # too many neighbours for sel
        raise DataError(str(exc)) from exc
    has_virial = frame.virial is not None
    virial = frame.virial if has_virial else np.zeros((3, 3))
    return {
        **{k: x[k] for k in (K.POSITIONS, K.CELL, K.PBC, K.NUMBERS, K.TYPES, K.N_ATOMS)},
        K.ENERGY: torch.tensor([float(frame.energy)], dtype=torch.float64),
        K.FORCES: torch.as_tensor(frame.forces, dtype=torch.float64),
        K.VIRIAL: torch.as_tensor(virial, dtype=torch.float64).reshape(1, 3, 3),
        K.HAS_VIRIAL: torch.tensor([has_virial]),
        K.NEIGHBORS: x[K.NEIGHBORS],
        K.SHIFTS: x[K.SHIFTS],
        K.FRAME_ID: torch.tensor([frame_id], dtype=torch.int64),
        K.MAX_COUNT: x[K.MAX_COUNT],
    }


class AtomsDataset(Dataset):
    """Frames with neighbour lists, built once.

    Args:
        frames: labelled frames (see :func:`rlekf.data.readers.read_frames`).
        type_map: element symbols of the model.
        rcut: cutoff (Å) of the model.
        sel: neighbour slots per type of the model.
        frame_ids: global ids stored in each item (default ``range(len(frames))``).
        dtype: float dtype of positions and cells; energy, force and virial labels are float64
            whatever this is (a float32 label of −357,700 eV is 0.03 eV coarse).
    """

    def __init__(
        self,
        frames: Sequence[Frame],
        type_map: Sequence[str],
        rcut: float,
        sel: Sequence[int],
        frame_ids: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        self.frames = list(frames)
        ids = list(range(len(self.frames))) if frame_ids is None else list(frame_ids)
        converter = AtomsConverter(type_map, rcut, sel, dtype)
        self.items = [_item(converter, f, i) for f, i in zip(self.frames, ids, strict=True)]
        ntypes = len(type_map)
        self.max_neighbors = np.zeros(ntypes, dtype=np.int64)
        for item in self.items:
            self.max_neighbors = np.maximum(self.max_neighbors, item.pop(K.MAX_COUNT).numpy())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.items[i]

    @property
    def n_atoms(self) -> list[int]:
        return [int(item[K.N_ATOMS][0]) for item in self.items]

    @property
    def has_virial(self) -> bool:
        """True when every frame carries a virial label."""
        return bool(self.items) and all(bool(it[K.HAS_VIRIAL][0]) for it in self.items)


_PER_FRAME = (K.CELL, K.PBC, K.N_ATOMS, K.ENERGY, K.VIRIAL, K.HAS_VIRIAL, K.FRAME_ID)
_PER_ATOM = (K.POSITIONS, K.NUMBERS, K.TYPES, K.FORCES, K.SHIFTS)


def collate_atoms(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate frames of any sizes into one batch; neighbour indices become global."""
    batch: dict[str, torch.Tensor] = {}
    for key in _PER_FRAME + _PER_ATOM:
        batch[key] = torch.cat([it[key] for it in items], dim=0)
    counts = [int(it[K.N_ATOMS][0]) for it in items]
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    nbrs = []
    for it, off in zip(items, offsets, strict=True):
        nb = it[K.NEIGHBORS].to(torch.int64)
        nbrs.append(torch.where(nb >= 0, nb + int(off), nb))
    batch[K.NEIGHBORS] = torch.cat(nbrs, dim=0)
    batch[K.BATCH] = torch.repeat_interleave(
        torch.arange(len(items), dtype=torch.int64), torch.tensor(counts)
    )
    return batch


class GroupedBatchSampler(Sampler[list[int]]):
    """Batches whose frames all have the same atom count (needed by the Kalman energy update).

    Frames are grouped by atom count; with ``shuffle`` the order inside each group and the order
    of the batches are drawn from a generator seeded with ``seed + epoch``, so every epoch is
    reproducible and a run resumed at an epoch boundary sees the same batches. Under
    torch.distributed each rank takes every ``num_replicas``-th batch of the same order (ranks
    and world size are read from the initialised process group unless given; use it with
    ``Trainer(use_distributed_sampler=False)``, as ``trainer=ddp`` does). For a run resumed
    in the middle of an epoch, ``resume_from(epoch, batches_done)`` makes the next pass over
    that epoch skip the batches already trained on.
    """

    def __init__(
        self,
        n_atoms: Sequence[int],
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = dist.get_world_size() if ready else 1
            rank = dist.get_rank() if ready else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} not in [0, {num_replicas})")
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.n_atoms = list(n_atoms)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self._skip: tuple[int, int] | None = None
        # Lightning calls set_epoch on `batch_sampler.sampler`, not on the batch sampler
        self.sampler = _EpochForwarder(self)

    def resume_from(self, epoch: int, batches_done: int) -> None:
        """Continue a run at ``epoch``, skipping its first ``batches_done`` batches once.

        Sets the epoch too: when resuming, Lightning builds the iterator before it calls
        ``set_epoch``, so the sampler must already know which epoch's order to produce.
        """
        self.epoch = int(epoch)
        self._skip = (int(epoch), int(batches_done))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _with_epoch(self, epoch: int) -> list[list[int]]:
        """The batches of ``epoch`` (for tests and tools; does not change the sampler)."""
        saved, self.epoch = self.epoch, epoch
        try:
            return self._batches()
        finally:
            self.epoch = saved

    def _batches(self) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(self.n_atoms):
            groups.setdefault(n, []).append(i)
        batches: list[list[int]] = []
        for n in sorted(groups):
            idx = groups[n]
            if self.shuffle:
                idx = [idx[k] for k in torch.randperm(len(idx), generator=gen).tolist()]
            batches += [idx[k : k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        if self.shuffle:
            batches = [batches[k] for k in torch.randperm(len(batches), generator=gen).tolist()]
        return batches

    def _shard(self, batches: list[list[int]]) -> list[list[int]]:
        """This rank's share under data parallelism: every ``num_replicas``-th batch, the list
        padded (by repeating its start) so that every rank makes the same number of steps."""
        if self.num_replicas == 1 or not batches:
            return batches
        per_rank = -(-len(batches) // self.num_replicas)
        padded = batches + batches[: per_rank * self.num_replicas - len(batches)]
        return padded[self.rank :: self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._shard(self._batches())
        if self._skip is not None and self._skip[0] == self.epoch:
            batches = batches[self._skip[1] :]
            self._skip = None
        return iter(batches)

    def __len__(self) -> int:
        groups: dict[int, int] = {}
        for n in self.n_atoms:
            groups[n] = groups.get(n, 0) + 1
        total = sum(-(-c // self.batch_size) for c in groups.values())
        return -(-total // self.num_replicas)


class _EpochForwarder:
    """Exposes ``set_epoch`` where Lightning looks for it (``batch_sampler.sampler``)."""

    def __init__(self, owner: GroupedBatchSampler) -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)
