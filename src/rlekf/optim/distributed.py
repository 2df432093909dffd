"""Data-parallel RLEKF with the covariance blocks sharded across ``torch.distributed`` ranks.

Reference: section 3.3 of the RLEKF reference notes (DeePMD-kit's distributed LKF, PR #3436).
Differences from that implementation:

* blocks are assigned by cost ``n_i**2`` (greedy, largest first, to the least-loaded rank)
  instead of contiguous ranges of equal count, so the memory per rank is balanced;
* the per-block quadratic forms are reduced as a length-``L`` vector (each rank fills its own
  entries, the rest are zeros), and the weight increments as a zero-padded flat vector, so the
  result is the single-process :class:`~rlekf.optim.RLEKF` update with the averaged gradient
  and error (adding zeros is exact; bitwise on CPU with two ranks, to rounding where the error
  average ``sum / world`` rounds, or where ``batch_blocks`` groups other blocks together on a
  rank than in one process);
* the model and ``P`` may be float32 or float64 (the buffers use ``p_dtype``);
* every rank's :meth:`ShardedRLEKF.state_dict` holds its own shard with its global block
  indices, and :meth:`ShardedRLEKF.gather_state_dict` assembles a single-process RLEKF state
  dict on one rank (the reference writes only rank 0's shard, so a restart loses the rest).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rlekf.optim.rlekf import (
    _GIB,
    _P,
    _P_SCALE,
    RLEKF,
)

__all__ = ["ShardedRLEKF", "assign_blocks"]

_SHARDING = "sharding"


def assign_blocks(costs: Sequence[int], world_size: int) -> tuple[int, ...]:
    """Assign blocks to ranks, balancing the total cost (greedy longest-processing-time).

    Blocks are taken by decreasing cost (ties: lower block index first) and each goes to the
    rank with the smallest load so far (ties: lower rank). Deterministic, so every rank
    computes the same assignment without communication.

    Args:
        costs: Cost of each block (``n_i**2``, the size of ``P_i``).
        world_size: Number of ranks (``>= 1``).

    Returns:
        The owning rank of each block, in block order.
    """
    if world_size < 1:
        raise ValueError(f"Invalid world_size: {world_size}")
    load = [0] * world_size
    owner = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        r = min(range(world_size), key=lambda q: (load[q], q))
        owner[i] = r
        load[r] += costs[i]
    return tuple(owner)


class ShardedRLEKF(RLEKF):
    r"""RLEKF over ``torch.distributed`` with ``P = diag(P_1, ..., P_L)`` sharded across ranks.

    Every rank holds the full model (data parallelism) but allocates only the covariance
    blocks it owns (:attr:`owned_blocks`, chosen by :func:`assign_blocks`), so ``P`` takes
    about ``1 / world_size`` of the single-process memory per rank (:attr:`p_bytes_local`).
    One :meth:`step` does:

    1. average the flattened gradient ``H`` (unless ``average_grads=False``) and the error
       ``eps`` over the ranks (one ``all_reduce(SUM)`` of ``[H, eps]`` divided by the world
       size). Each rank back-propagates its own local data; under
       :class:`~torch.nn.parallel.DistributedDataParallel` the gradients are already averaged,
       so pass ``average_grads=False`` (the error is then still averaged, alone);
    2. each rank computes ``H_i^T P_i H_i`` for its own blocks; one ``all_reduce(SUM)`` of the
       zero-padded vector of all ``L`` quadratic forms (plus a count of ranks that saw a
       non-finite value) gives every rank the same ``a = L*lambda + sum_i H_i^T P_i H_i``.
       A non-finite error, gradient or ``a``, or ``a <= 0``, on any rank skips the update on
       all ranks (counted in :attr:`n_skipped`);
    3. each rank updates its own ``P_i <- (P_i - K_i K_i^T / a) / lambda`` with
       ``K_i = P_i H_i`` (the same in-place kernel as :func:`~rlekf.optim.rlekf_update`);
    4. the increments ``(eps / a) K_i`` are written into a zero flat vector, summed over the
       ranks, and every rank adds the full increment, so all ranks keep identical weights;
       ``lambda`` and the counters advance identically everywhere.

    The result equals single-process :class:`~rlekf.optim.RLEKF` fed the averaged gradient
    and error (bitwise on CPU/gloo in the tests). Without an initialised process group (or
    with a one-rank group) it runs as a one-rank shard of itself, with no communication.

    Checkpoints: :meth:`state_dict` returns this rank's shard (its ``P_i`` with their global
    block indices, the rank, the world size and the assignment, plus ``lambda`` and the
    counters, which are the same on all ranks). **Every rank must save its own file**, e.g.
    ``f"opt-rank{rank}.pt"``, and load it back on the same rank of a group of the same size:
    :meth:`load_state_dict` refuses (``ValueError``) a shard saved with another world size,
    rank or block assignment. Re-sharding onto a different number of ranks is not
    implemented for shard files; instead call :meth:`gather_state_dict` (collective) before
    saving: it returns on ``dst`` a plain single-process RLEKF state dict with all blocks,
    which both :class:`~rlekf.optim.RLEKF` and a ``ShardedRLEKF`` of any world size load
    (each rank keeps its own blocks).

    :meth:`step_k` (the fused rank-``k`` mode) is sharded the same way.

    Args:
        params: As for :class:`~rlekf.optim.RLEKF`.
        process_group: The group to shard over; ``None`` uses the default (WORLD) group when
            ``torch.distributed`` is initialised, otherwise a single rank.
        average_grads: Average ``.grad`` over the ranks in :meth:`step` (default ``True``);
            set it to ``False`` when DDP has already averaged them.
        max_p_bytes: Limit on the bytes of this rank's shard (not of the whole ``P``).
        **kwargs: ``block_size``, ``lambda0``, ``nu``, ``p0``, ``p_dtype``,
            ``symmetrize_every``, as for :class:`~rlekf.optim.RLEKF`.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        process_group: Any = None,
        average_grads: bool = True,
        max_p_bytes: int | str | None = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(params, max_p_bytes=None, **kwargs)
        if process_group is None and dist.is_available() and dist.is_initialized():
            process_group = dist.group.WORLD
        self._pg = process_group
        if process_group is None:
            self._rank, self._world = 0, 1
        else:
            self._rank = dist.get_rank(process_group)
            self._world = dist.get_world_size(process_group)
        self.average_grads = bool(average_grads)
        self._assignment = assign_blocks([b.numel**2 for b in self._blocks], self._world)
        self._owned = tuple(i for i, r in enumerate(self._assignment) if r == self._rank)
        if (
            max_p_bytes is not None
            and max_p_bytes != "auto"
            and (
                isinstance(max_p_bytes, bool)
                or not isinstance(max_p_bytes, int)
                or max_p_bytes <= 0
            )
        ):
            raise ValueError(
                f"Invalid max_p_bytes: {max_p_bytes!r} (expected int > 0, 'auto' or None)"
            )
        self._max_p_bytes = max_p_bytes
        if max_p_bytes == "auto":
            self._check_memory()
        elif max_p_bytes is not None and self.p_bytes_local > max_p_bytes:
            raise ValueError(
                f"ShardedRLEKF: the covariance shard of rank {self._rank} would need "
                f"{self.p_bytes_local / _GIB:.2f} GiB ({len(self._owned)} of "
                f"{len(self._blocks)} blocks, world size {self._world}), above max_p_bytes = "
                f"{max_p_bytes}. Use more ranks, a smaller block_size or p_dtype='float32'."
            )

    # ------------------------------------------------------------------ sharding info
    @property
    def rank(self) -> int:
        """This process's rank in the process group."""
        return self._rank

    @property
    def world_size(self) -> int:
        """Number of ranks sharing ``P``."""
        return self._world

    @property
    def assignment(self) -> tuple[int, ...]:
        """Owning rank of every block, in block order."""
        return self._assignment

    @property
    def owned_blocks(self) -> tuple[int, ...]:
        """Global indices of the blocks whose ``P_i`` this rank holds, increasing."""
        return self._owned

    @property
    def p_numel_local(self) -> int:
        """Entries of this rank's (logical) covariance blocks, ``sum n_i**2``."""
        return sum(self._blocks[i].numel ** 2 for i in self._owned)

    @property
    def p_bytes_local(self) -> int:
        """Bytes of this rank's stored covariance blocks (allocated at the first step)."""
        return self._local_p_bytes()

    def _local_block_indices(self) -> Sequence[int]:
        """This rank's blocks: ``covariance`` holds their ``P_i`` in this order."""
        return getattr(self, "_owned", range(len(self._blocks)))

    def _all_reduce_sum(self, t: Tensor) -> None:
        if self._world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._pg)

    # ------------------------------------------------------------------ update
    # step() and step_k() are RLEKF's; they are collective here because the three reduction
    # hooks below are: every rank of the group must call them. They return this rank's error
    # (or closure value), not the average.
    def _reduce_rows(self, rows: Tensor, given: bool) -> Tensor:
        """(1) Average the ``(k, N)`` gradient rows over the ranks (unless DDP already did:
        ``average_grads=False``). ``given``: ``rows`` may be the caller's tensor."""
        if self._world > 1 and self.average_grads:
            if given:
                rows = rows.clone()
            self._all_reduce_sum(rows)
            rows.div_(self._world)
        return rows

    def _reduce_stats(self, stats: Tensor) -> None:
        """(2) Sum the zero-padded per-block quadratic forms, the errors and the non-finite
        count over the ranks (the errors are then divided by the world size)."""
        self._all_reduce_sum(stats)

    def _reduce_increment(self, dw: Tensor) -> None:
        """(4) Sum the zero-padded weight increments: every rank gets all of them."""
        self._all_reduce_sum(dw)

    def _n_ranks(self) -> int:
        return self._world

    @torch.no_grad()
    def kalman_stats(self) -> dict[str, Any]:
        """As :meth:`RLEKF.kalman_stats`, over ALL blocks (collective: every rank calls it).

        Extra keys: ``rank``, ``world_size``, ``owned_blocks``.
        """
        stats = super().kalman_stats()
        stats.update(rank=self._rank, world_size=self._world, owned_blocks=list(self._owned))
        return stats

    def _diag_stats(self) -> list[list[float]]:
        """Trace and min-diagonal of every block: the own blocks' values, summed into a
        zero-padded ``(L, 2)`` tensor across the ranks (collective)."""
        device = self._group["params"][0].device
        red = torch.zeros(len(self._blocks), 2, dtype=torch.float64, device=device)
        for i, diag in zip(self._owned, self._local_diag(), strict=True):
            red[i, 0] = diag.sum()
            red[i, 1] = diag.min()
        self._all_reduce_sum(red)
        return red.tolist()

    # ------------------------------------------------------------------ checkpointing
    def _sharding_meta(self) -> dict[str, Any]:
        return {
            "rank": self._rank,
            "world_size": self._world,
            "owned_blocks": list(self._owned),
            "assignment": list(self._assignment),
            "block_sizes": self.block_sizes,
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: the base optimizer state (``P`` = own blocks only) + sharding.

        ``state_dict()["sharding"]`` holds ``rank``, ``world_size``, ``owned_blocks`` (the
        global indices of the saved ``P`` list), ``assignment`` and ``block_sizes``. Save one
        file per rank (e.g. ``f"opt-rank{rank}.pt"``); see also :meth:`gather_state_dict`.
        """
        sd = super().state_dict()
        sd[_SHARDING] = self._sharding_meta()
        return sd

    def gather_state_dict(self, dst: int = 0) -> dict[str, Any] | None:
        """Collect all ``P`` blocks on rank ``dst`` as a single-process RLEKF state dict.

        Collective: every rank of the group must call it. The blocks travel through
        ``gather_object`` (CPU pickles), so this needs host memory for the whole ``P`` on
        ``dst``.

        Returns:
            On ``dst``: a state dict without the ``"sharding"`` key that
            :class:`~rlekf.optim.RLEKF` and a ``ShardedRLEKF`` of any world size can load
            (``P`` blocks on the CPU, in block order). ``None`` on the other ranks.
        """
        self.flush()
        self._storage()
        anchor = self._anchor
        mine = [
            (i, p.detach().cpu().clone(), c)
            for i, p, c in zip(self._owned, anchor[_P], anchor[_P_SCALE], strict=True)
        ]
        if self._world > 1:
            parts: list[Any] | None = [None] * self._world if self._rank == dst else None
            dist.gather_object(mine, parts, dst=dst, group=self._pg)
        else:
            parts = [mine]
        if self._rank != dst:
            return None
        assert parts is not None
        blocks: dict[int, tuple[Tensor, float]] = {}
        for part in parts:
            blocks.update({i: (p, c) for i, p, c in part})
        sd = super().state_dict()
        anchor_id = sd["param_groups"][0]["params"][0]
        anchor = dict(sd["state"][anchor_id])
        anchor[_P] = [blocks[i][0] for i in range(len(self._blocks))]
        anchor[_P_SCALE] = [blocks[i][1] for i in range(len(self._blocks))]
        sd["state"] = {**sd["state"], anchor_id: anchor}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load this rank's shard from :meth:`state_dict`, or the own blocks of a full dict.

        Args:
            state_dict: Either a shard saved by the same rank of a group of the same size
                with the same block layout, or a single-process RLEKF state dict (from
                :class:`~rlekf.optim.RLEKF` or :meth:`gather_state_dict`) holding all blocks.

        Raises:
            ValueError: If the shard was saved with a different world size, rank, block
                layout or assignment (re-sharding a shard is not implemented: gather the
                full state with :meth:`gather_state_dict` in the old run instead).
        """
        meta = state_dict.get(_SHARDING)
        saved_state, anchor_id, saved_anchor = self._saved_anchor(state_dict)
        saved_p = saved_anchor.get(_P)
        saved_scales = saved_anchor.get(_P_SCALE)
        tile = int(state_dict["param_groups"][0].get("tile", self.tile))

        if meta is not None:
            if int(meta["world_size"]) != self._world:
                raise ValueError(
                    f"ShardedRLEKF shard was saved by rank {meta['rank']} of "
                    f"{meta['world_size']} ranks, but this group has {self._world} rank(s). "
                    "Restart on the same number of ranks (each loading its own "
                    "'...-rank{r}' file); re-sharding a shard is not implemented. To change "
                    "the number of ranks, save gather_state_dict() (all blocks) and load that."
                )
            if int(meta["rank"]) != self._rank:
                raise ValueError(
                    f"ShardedRLEKF shard belongs to rank {meta['rank']}, this is rank "
                    f"{self._rank}: load each rank's own file"
                )
            if (
                list(meta["block_sizes"]) != self.block_sizes
                or tuple(meta["assignment"]) != self._assignment
            ):
                raise ValueError(
                    "ShardedRLEKF shard block layout/assignment does not match: saved block "
                    f"sizes {list(meta['block_sizes'])} assigned {list(meta['assignment'])}, "
                    f"expected {self.block_sizes} assigned {list(self._assignment)}. Use the "
                    "same parameters (in the same order), block_size and world size."
                )
            own_p = saved_p
            own_scales = saved_scales
            if own_p is not None and len(own_p) != len(self._owned):
                raise ValueError(
                    f"ShardedRLEKF shard holds {len(own_p)} blocks, expected {len(self._owned)}"
                )
        else:
            own_p = None
            own_scales = None
            if saved_p is not None:
                self._check_layout(
                    saved_p,
                    tile,
                    "A single-process RLEKF state dict must hold all blocks (use "
                    "gather_state_dict on a sharded run).",
                )
                own_p = [saved_p[i] for i in self._owned]
                if saved_scales is not None:
                    own_scales = [saved_scales[i] for i in self._owned]

        top = {k: v for k, v in state_dict.items() if k != _SHARDING}
        self._restore(top, saved_state, anchor_id, saved_anchor, own_p, own_scales)
