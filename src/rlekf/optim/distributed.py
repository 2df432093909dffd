"""Data-parallel RLEKF with the covariance blocks sharded across ``torch.distributed`` ranks.

Reference: section 3.3 of the RLEKF reference notes (DeePMD-kit's distributed LKF, PR #3436).
Differences from that implementation:

* blocks are assigned by cost ``n_i**2`` (greedy, largest first, to the least-loaded rank)
  instead of contiguous ranges of equal count, so the memory per rank is balanced;
* the per-block quadratic forms are reduced as a length-``L`` vector (each rank fills its own
  entries, the rest are zeros), and the weight increments as a zero-padded flat vector, so the
  result is bitwise the single-process :class:`~rlekf.optim.RLEKF` update with the averaged
  gradient and error (adding zeros is exact), whatever the number of ranks;
* the model and ``P`` may be float32 or float64 (the buffers use ``p_dtype``);
* every rank's :meth:`ShardedRLEKF.state_dict` holds its own shard with its global block
  indices, and :meth:`ShardedRLEKF.gather_state_dict` assembles a single-process RLEKF state
  dict on one rank (the reference writes only rank 0's shard, so a restart loses the rest).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rlekf.optim.functional import (
    RLEKFRankKUpdate,
    rank_k_apply_,
    rank_k_factors,
    rank_k_gain,
)
from rlekf.optim.rlekf import (
    _GIB,
    _P,
    RLEKF,
    _flat,
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
        max_p_bytes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(params, **kwargs)
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
        if max_p_bytes is not None and (
            isinstance(max_p_bytes, bool) or not isinstance(max_p_bytes, int) or max_p_bytes <= 0
        ):
            raise ValueError(f"Invalid max_p_bytes: {max_p_bytes!r} (expected int > 0 or None)")
        if max_p_bytes is not None and self.p_bytes_local > max_p_bytes:
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
        """Elements of this rank's covariance blocks."""
        return sum(self._blocks[i].numel ** 2 for i in self._owned)

    @property
    def p_bytes_local(self) -> int:
        """Bytes of this rank's covariance blocks (allocated at the first step)."""
        return self.p_numel_local * self.p_dtype.itemsize

    def _local_block_indices(self) -> Sequence[int]:
        """This rank's blocks: ``covariance`` holds their ``P_i`` in this order."""
        return self._owned

    def _all_reduce_sum(self, t: Tensor) -> None:
        if self._world > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self._pg)

    # ------------------------------------------------------------------ update
    # step() is RLEKF.step (closure, error, grads= -> step_k); it is collective here because
    # _update and step_k are: every rank of the group must call it. It returns this rank's
    # error (or closure value), not the average.
    def _update(self, eps_local: float) -> None:
        """One distributed rank-1 update (steps 1-4 of the class doc)."""
        params: list[Tensor] = self._group["params"]
        device = params[0].device
        dtype = self.p_dtype
        n_total = sum(p.numel() for p in params)

        # (1) flat [H, eps] in p_dtype, averaged over the ranks (only eps when DDP has already
        # averaged the gradients: average_grads=False)
        buf = torch.zeros(n_total + 1, dtype=dtype, device=device)
        off = 0
        for p in params:
            g = p.grad
            if g is not None:
                if g.is_sparse:
                    raise ValueError("RLEKF does not support sparse gradients")
                buf[off : off + p.numel()].copy_(_flat(g))
            off += p.numel()
        buf[n_total] = eps_local
        if self._world > 1:
            shared = buf if self.average_grads else buf[n_total:]
            self._all_reduce_sum(shared)
            shared.div_(self._world)
        flat_h = buf[:n_total]
        eps = float(buf[n_total])

        # (2) own quadratic forms, zero-padded to all L blocks, plus a "bad" count
        P = self._covariance()
        n_blocks = len(self._blocks)
        red = torch.zeros(n_blocks + 1, dtype=dtype, device=device)
        gains: list[Tensor] = []
        h_ok: list[Tensor] = []
        for i, p_i in zip(self._owned, P, strict=True):
            b = self._blocks[i]
            h = flat_h[b.offset : b.offset + b.numel]
            k = torch.mv(p_i, h)
            gains.append(k)
            red[i] = torch.dot(h, k)
            h_ok.append(torch.isfinite(h).all())
        local_bad = not math.isfinite(eps)
        if h_ok and not bool(torch.stack(h_ok).all()):
            local_bad = True
        red[n_blocks] = 1.0 if local_bad else 0.0
        self._all_reduce_sum(red)
        lam = self.lam
        # the same expression as functional.innovation: sum of the L quads, then + L*lam
        a_t = red[:n_blocks].sum() + n_blocks * lam
        a, n_bad = torch.stack([a_t, red[n_blocks]]).tolist()
        if n_bad != 0 or not (math.isfinite(a) and a > 0.0):
            self._finish_1(a, None, P)
            return

        # (3) own P_i update, as in functional.rlekf_update
        beta = 1.0 / lam
        root = math.sqrt(a * lam)
        scale = eps * root / a
        dw = torch.zeros(n_total, dtype=dtype, device=device)
        for i, p_i, k in zip(self._owned, P, gains, strict=True):
            b = self._blocks[i]
            k.div_(root)
            p_i.addr_(k, k, beta=beta, alpha=-1.0)
            k.mul_(scale)
            dw[b.offset : b.offset + b.numel].copy_(k)

        # (4) full increment on every rank (zero padding: the sum is exact)
        self._all_reduce_sum(dw)
        self._finish_1(a, [dw[b.offset : b.offset + b.numel] for b in self._blocks], P)

    @torch.no_grad()
    def step_k(  # type: ignore[override]
        self,
        errors: Sequence[float] | Tensor,
        grads: Tensor | Sequence[Sequence[Tensor | None]],
    ) -> RLEKFRankKUpdate:
        """One distributed rank-``k`` update (collective), as :meth:`RLEKF.step_k`.

        Three all-reduces, as in :meth:`step`: the ``(k, N)`` gradient rows (averaged over
        the ranks unless ``average_grads=False``); one float64 vector holding every block's
        ``k x k`` quadratic form ``H_i^T P_i H_i`` (zero for blocks of other ranks), this
        rank's ``k`` errors (averaged) and a count of ranks with non-finite ``H``; the
        zero-padded weight increments. Every rank then sums the quadratic forms in block
        order and does the same float64 ``k x k`` algebra
        (:func:`~rlekf.optim.functional.rank_k_factors`), so ``A`` and the skip decision are
        identical everywhere, and the result equals single-process :meth:`RLEKF.step_k` fed
        the averaged rows and errors (bitwise for float64 ``P``).

        Returns:
            The update with the full increments of all blocks (every rank).
        """
        if isinstance(errors, Tensor):
            eps_local = errors.detach().to(dtype=torch.float64).reshape(-1)
        else:
            eps_local = torch.as_tensor([float(e) for e in errors], dtype=torch.float64)
        k = eps_local.numel()
        if k == 0:
            raise ValueError("ShardedRLEKF.step_k needs at least one error")
        rows = self._gradient_rows(grads, k)
        device = rows.device
        if self._world > 1 and self.average_grads:
            if isinstance(grads, Tensor):  # may be the caller's tensor: do not reduce it
                rows = rows.clone()
            self._all_reduce_sum(rows)
            rows.div_(self._world)

        P = self._covariance()
        n_blocks = len(self._blocks)
        kk = k * k
        red = torch.zeros(n_blocks * kk + k + 1, dtype=torch.float64, device=device)
        gains: list[Tensor] = []
        h_ok: list[Tensor] = []
        for i, p_i in zip(self._owned, P, strict=True):
            b = self._blocks[i]
            g, q, ok = rank_k_gain(p_i, rows[:, b.offset : b.offset + b.numel].mT)
            gains.append(g)
            red[i * kk : (i + 1) * kk].copy_(q.reshape(-1))
            h_ok.append(ok)
        red[n_blocks * kk : n_blocks * kk + k].copy_(eps_local)
        if h_ok and not bool(torch.stack(h_ok).all()):
            red[-1] = 1.0
        self._all_reduce_sum(red)
        host = red.cpu()
        eps = host[n_blocks * kk : n_blocks * kk + k]
        if self._world > 1:
            eps = eps / self._world
        quads = host[: n_blocks * kk].view(n_blocks, k, k)
        quad = quads[0].clone()
        for i in range(1, n_blocks):  # block order, as the single-process sum
            quad.add_(quads[i])
        lam = self._lam_product(k)
        if not bool(torch.isfinite(eps).all()):
            res = RLEKFRankKUpdate(torch.full((k, k), math.nan, dtype=torch.float64), False, ())
            self._finish_k(res, P)
            return res
        A, factors = rank_k_factors(quad, bool(host[-1] == 0), eps, lam, n_blocks)
        if factors is None:
            res = RLEKFRankKUpdate(A, False, ())
            self._finish_k(res, P)
            return res
        n_total = rows.shape[1]
        dw = torch.zeros(n_total, dtype=self.p_dtype, device=device)
        for i, p_i, g in zip(self._owned, P, gains, strict=True):
            b = self._blocks[i]
            dw[b.offset : b.offset + b.numel].copy_(rank_k_apply_(p_i, g, factors, lam))
        self._all_reduce_sum(dw)
        res = RLEKFRankKUpdate(
            A, True, tuple(dw[b.offset : b.offset + b.numel] for b in self._blocks)
        )
        self._finish_k(res, P)
        return res

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
        for i, p in zip(self._owned, self._covariance(), strict=True):
            diag = p.diagonal()
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
        P = self._covariance()
        mine = [(i, p.detach().cpu()) for i, p in zip(self._owned, P, strict=True)]
        if self._world > 1:
            parts: list[Any] | None = [None] * self._world if self._rank == dst else None
            dist.gather_object(mine, parts, dst=dst, group=self._pg)
        else:
            parts = [mine]
        if self._rank != dst:
            return None
        assert parts is not None
        blocks: dict[int, Tensor] = {}
        for part in parts:
            blocks.update(dict(part))
        sd = super().state_dict()
        anchor_id = sd["param_groups"][0]["params"][0]
        anchor = dict(sd["state"][anchor_id])
        anchor[_P] = [blocks[i] for i in range(len(self._blocks))]
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
            if own_p is not None and len(own_p) != len(self._owned):
                raise ValueError(
                    f"ShardedRLEKF shard holds {len(own_p)} blocks, expected {len(self._owned)}"
                )
        else:
            own_p = None
            if saved_p is not None:
                self._check_layout(
                    saved_p,
                    "A single-process RLEKF state dict must hold all blocks (use "
                    "gather_state_dict on a sharded run).",
                )
                own_p = [saved_p[i] for i in self._owned]

        top = {k: v for k, v in state_dict.items() if k != _SHARDING}
        self._restore(top, saved_state, anchor_id, saved_anchor, own_p)
