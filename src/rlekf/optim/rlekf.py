"""RLEKF as a :class:`torch.optim.Optimizer`."""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from rlekf.optim import tile_kernel
from rlekf.optim.functional import (
    KalmanFactors,
    RLEKFRankKUpdate,
    kalman_factors,
    negative_diagonal,
    rounding_floor,
)
from rlekf.optim.partition import Block, partition_parameters, validate_block_size
from rlekf.optim.tiled import (
    DEFAULT_TILE,
    DEFAULT_TILE_CUDA,
    KERNELS,
    TileGroup,
    _TileVectors,
    group_blocks,
    lower_tile_numel,
    pack_lower_tiles,
    packed_block_size,
    unpack_lower_tiles,
)
from rlekf.utils.dtypes import FLOAT_DTYPES, float_dtype_name

__all__ = ["RLEKF", "available_memory_bytes", "state_covariance"]

log = logging.getLogger(__name__)

_GIB = float(1 << 30)
# symmetrize_every=None: every 100 applied updates. Only the diagonal tiles are stored with
# both triangles, so only they can drift from symmetry through rounding.
_AUTO_SYMMETRIZE = 100
# Keys of the state held under the anchor parameter (the first parameter of the group).
_LAM, _N_UPDATES, _N_SKIPPED, _LAST_A, _P = "lam", "n_updates", "n_skipped", "last_innovation", "P"
_P_SCALE, _N_INDEF, _SYM_DUE = "P_scale", "n_indefinite", "symmetrize_due"
# Weight orders inside blocks: "output_major" flattens every 2-D weight with its output
# neurons as the slow index (whole fan-ins together: PWMLFF/DeePMD-kit's ``param.T``);
# "storage" flattens every tensor as stored (checkpoints written before the option existed).
_WEIGHT_ORDERS = ("output_major", "storage")
_KERNEL_CHOICES = ("auto",) + KERNELS
# Attribute of a 2-D parameter naming its output dimension (0, as torch.nn.Linear's (out, in),
# when absent; rlekf's Dense layers store (in, out) and set it to 1).
OUTPUT_DIM_ATTR = "rlekf_output_dim"


def available_memory_bytes(device: torch.device | str) -> int | None:
    """Bytes that can still be allocated on ``device`` (``None`` if unknown).

    CPU: ``MemAvailable`` of ``/proc/meminfo`` (Linux); CUDA: the free memory reported by
    ``torch.cuda.mem_get_info``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def state_covariance(state_dict: dict[str, Any]) -> list[Tensor]:
    """The covariance blocks held by an RLEKF (or ShardedRLEKF shard) state dict, as full
    ``(n_i, n_i)`` matrices in their stored dtype, in the order stored.

    Reads both formats: packed lower tiles with ``P_scale`` (this version) and the full blocks
    of earlier versions.
    """
    group = state_dict["param_groups"][0]
    anchor = state_dict["state"][group["params"][0]]
    tile = int(group.get("tile", DEFAULT_TILE))
    scales = anchor.get(_P_SCALE)
    out = []
    for i, t in enumerate(anchor.get(_P, [])):
        if t.dim() == 2:
            out.append(t.clone())
            continue
        n = packed_block_size(t.numel(), tile)
        if n is None:
            raise ValueError(f"block {i}: {t.numel()} elements are no packed block of tile {tile}")
        dense = unpack_lower_tiles(t, n, tile)
        out.append(dense.mul_(scales[i]) if scales is not None else dense)
    return out


def _resolve_p_dtype(p_dtype: torch.dtype | str) -> str:
    """Canonical name (``"float64"`` or ``"float32"``) of a covariance dtype."""
    return float_dtype_name(p_dtype, "p_dtype")


def _real(name: str, value: Any, expected: str, ok: Callable[[float], bool]) -> float:
    """Validate a real hyperparameter and return it as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    v = float(value)
    if not ok(v):
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    return v


def _int_option(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {minimum})")
    return value


def _flat(t: Tensor) -> Tensor:
    """``t.reshape(-1)``; a view for contiguous tensors."""
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


def _tagged(params: Sequence[Tensor]) -> list[int]:
    """Indices of the 2-D parameters stored ``(in, out)`` (tagged ``rlekf_output_dim = 1``)."""
    return [
        i
        for i, p in enumerate(params)
        if p.dim() == 2 and getattr(p, OUTPUT_DIM_ATTR, 0) == 1 and min(p.shape) > 1
    ]


def weight_permutation(params: Sequence[Tensor], transposed: Sequence[int]) -> Tensor | None:
    """Positions in the concatenated ``p.reshape(-1)`` vector of each optimizer coordinate.

    Args:
        params: The parameters, in order.
        transposed: Indices of the 2-D parameters stored ``(in, out)`` that are flattened
            output-major (their transpose, row-major).

    Returns:
        ``perm`` (int64, length ``N``, on the parameters' device) with
        ``w_opt = w_storage[perm]``, or ``None`` when no parameter is permuted.
    """
    if not transposed:
        return None
    parts = []
    off = 0
    todo = set(transposed)
    for i, p in enumerate(params):
        n = p.numel()
        idx = torch.arange(off, off + n)
        if i in todo:
            if p.dim() != 2:
                raise ValueError(
                    f"RLEKF state: parameter {i} of shape {tuple(p.shape)} was flattened "
                    "output-major as a 2-D weight; the parameters do not match the saved run"
                )
            idx = idx.view(p.shape).t().reshape(-1)  # out-major order of an (in, out) tensor
        parts.append(idx)
        off += n
    return torch.cat(parts).to(params[0].device)


def _rounding_floors(g: TileGroup) -> list[float]:
    """:func:`~rlekf.optim.functional.rounding_floor` of each block of ``g`` (units of ``S``)."""
    return [rounding_floor(m, g.n, g.dtype) for m in g.diagonal().amax(1).tolist()]


class RLEKF(Optimizer):
    r"""Reorganized-layer extended Kalman filter (RLEKF, Hu et al., AAAI 2023).

    The parameters are flattened into one vector ``w`` (each tensor in registration order;
    2-D weights **output-major**, i.e. the fan-in of output neuron 0, then of neuron 1, ...,
    as PWMLFF and DeePMD-kit flatten ``param.T``; ``weight_order="storage"`` flattens each
    tensor as stored) and cut into ``L`` contiguous blocks by the "gather small, split big"
    rule (:func:`~rlekf.optim.partition_parameters`). The covariance is block diagonal,
    ``P = diag(P_1, ..., P_L)`` with ``P_i = p0 * I`` initially. One call to :meth:`step`
    consumes one scalar pseudo-measurement with error :math:`\varepsilon` and gradient
    ``H = p.grad`` (the caller back-propagates the signed, scaled prediction):

    .. math::

        a &= L\lambda_t + \textstyle\sum_i H_i^\top P_i H_i \quad\text{(one shared scalar)}\\
        K_i &= P_i H_i, \qquad w_i \leftarrow w_i + (\varepsilon / a) K_i\\
        P_i &\leftarrow (P_i - K_i K_i^\top / a) / \lambda_t\\
        \lambda_{t+1} &= \nu \lambda_t + 1 - \nu

    :meth:`step_k` is an opt-in "fused" variant that absorbs ``k`` measurements taken at
    the same weights in one rank-``k`` update (see its docstring for how it differs from
    ``k`` calls of :meth:`step`).

    Storage (:mod:`rlekf.optim.tiled`): each ``P_i = c_i (S_i - V_i V_i^T)`` keeps only the
    ``tile x tile`` tiles on and below the diagonal of ``S_i`` (about half of ``n_i**2``), a
    float64 scale ``c_i`` that absorbs the forgetting factor, and a pending correction
    ``V_i`` that the next update applies in the same pass that computes ``S_i H_i``: one
    read and one write of the stored triangle per update. ``P`` is symmetric by construction
    (the diagonal tiles are re-symmetrised every ``symmetrize_every`` updates). The
    innovation, the scales and the weight increments are float64 whatever ``p_dtype``.

    ``P`` is kept in ``p_dtype`` independently of the model dtype (``H`` is cast to
    ``p_dtype``; the float64 increments are added back into the parameters). Updates with a
    non-finite error, gradient or innovation are skipped and counted in :attr:`n_skipped`;
    ``P``, the weights and ``lambda`` are left untouched. With ``P`` positive semi-definite
    every ``H_i^T P_i H_i >= 0``; a negative one means that ``P_i`` lost definiteness in that
    direction (float32 rounding): the update is skipped, counted in :attr:`n_indefinite`
    (and :attr:`n_skipped`), and ``S_i`` is shifted by ``delta * I`` with ``delta`` twice
    the offending Rayleigh quotient.

    Memory: ``itemsize * sum_i lower_tile_numel(n_i, tile)`` bytes (:meth:`estimate_p_bytes`),
    refused with a message above ``max_p_bytes``.

    Args:
        params: Parameters to optimize (one parameter group only, since the blocks and the
            innovation scalar span all of them). Every parameter must be on the same device.
        block_size: Maximum block size ``N_b`` (default 5120, as in PWMLFF and DeePMD-kit);
            ``None`` gives one block, i.e. the global EKF (GEKF).
        lambda0: Initial forgetting factor ``lambda_1`` in ``(0, 1]`` (default 0.98).
        nu: Growth rate of ``lambda`` in ``(0, 1]`` (default 0.9987); ``lambda0 = nu = 1``
            gives recursive least squares.
        p0: Initial covariance scale, ``P_0 = p0 * I`` (default 1.0; PWMLFF now uses 0.01).
        p_dtype: dtype of the stored ``P``: ``torch.float64`` (default) or ``torch.float32``;
            the strings ``"float64"``/``"float32"`` are accepted (Hydra configs).
        symmetrize_every: Replace every diagonal tile ``t`` by ``(t + t^T)/2`` every this many
            applied updates; 0 disables it. ``None`` (default) picks 100.
        max_p_bytes: Refuse (``ValueError``) to build an optimizer whose ``P`` would take more
            than this many bytes. ``"auto"`` (default): the memory still available on the
            parameters' device (``MemAvailable`` on the CPU, free memory on CUDA); ``None``:
            no limit.
        tile: Tile edge of the stored triangle (default ``None``: 256 on the CPU, 2048 on
            CUDA, where each tile costs kernel launches).
        batch_blocks: Update equal-size blocks with one batched call per tile (fewer kernel
            launches and less per-block work on the host). ``None`` (default): all of them
            on CUDA; on the CPU the blocks that fit in one tile (larger ones are updated one
            by one, with matrix-vector kernels for rank-1 updates).
        weight_order: ``"output_major"`` (default) or ``"storage"`` (the order of checkpoints
            written before this option; loaded checkpoints keep their own order).
        kernel: How a sweep over the stored tiles runs: ``"fused"`` (one compiled Numba loop
            nest per group, CPU only: every stored element read and written once, ~2.8x the
            torch kernel on a Cu model), ``"torch"`` (three library calls per tile, any
            device) or ``"auto"`` (default: fused on the CPU when Numba is installed, else
            torch). A runtime choice: a loaded state keeps this process's
            kernel. The two kernels agree to rounding (tested to 1e-12), not bit for bit.
        jitter: Whenever the diagonal tiles are re-symmetrised (every ``symmetrize_every``
            updates), add ``jitter * sqrt(n_i) * eps * max diag(S_i)`` to the diagonal of
            every block (:func:`~rlekf.optim.functional.rounding_floor`: the rounding level
            of the stored matrix), which keeps a float32 ``P`` positive definite where its
            own rounding would leave it indefinite (README "float32 P"). ``"auto"``
            (default): 1.0 for a float32 ``P``, 0 (off) for float64.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = RLEKF(model.parameters(), block_size=5120)
        >>> x, y = torch.randn(3), torch.tensor(0.5)
        >>> pred = model(x).sum()
        >>> pred.backward()                     # H = d(pred)/dw
        >>> _ = opt.step(error=(y - pred).item())  # one Kalman update
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        block_size: int | None = 5120,
        lambda0: float = 0.98,
        nu: float = 0.9987,
        p0: float = 1.0,
        p_dtype: torch.dtype | str = torch.float64,
        symmetrize_every: int | None = None,
        max_p_bytes: int | str | None = "auto",
        tile: int | None = None,
        batch_blocks: bool | None = None,
        weight_order: str = "output_major",
        kernel: str = "auto",
        jitter: float | str = "auto",
    ) -> None:
        block_size = validate_block_size(block_size)
        lambda0 = _real("lambda0", lambda0, "0 < lambda0 <= 1", lambda v: 0.0 < v <= 1.0)
        nu = _real("nu", nu, "0 < nu <= 1", lambda v: 0.0 < v <= 1.0)
        p0 = _real("p0", p0, "a positive finite float", lambda v: 0.0 < v < math.inf)
        p_dtype_name = _resolve_p_dtype(p_dtype)
        if symmetrize_every is None:
            symmetrize_every = _AUTO_SYMMETRIZE
        symmetrize_every = _int_option("symmetrize_every", symmetrize_every, 0)
        if tile is not None:
            tile = _int_option("tile", tile, 1)
        if weight_order not in _WEIGHT_ORDERS:
            raise ValueError(
                f"Invalid weight_order: {weight_order!r} (expected one of {_WEIGHT_ORDERS})"
            )
        if kernel not in _KERNEL_CHOICES:
            raise ValueError(f"Invalid kernel: {kernel!r} (expected one of {_KERNEL_CHOICES})")
        if kernel == "fused" and not tile_kernel.available():
            raise ImportError("kernel='fused' needs Numba (pip install numba), or kernel='torch'")
        if jitter != "auto":
            jitter = _real(
                "jitter", jitter, "'auto' or a float >= 0", lambda v: 0.0 <= v < math.inf
            )
        if batch_blocks is not None and not isinstance(batch_blocks, bool):
            raise ValueError(f"Invalid batch_blocks: {batch_blocks!r} (expected bool or None)")
        if max_p_bytes is not None and max_p_bytes != "auto":
            max_p_bytes = _int_option("max_p_bytes", max_p_bytes, 1)

        defaults = {
            "block_size": block_size,
            "lambda0": lambda0,
            "nu": nu,
            "p0": p0,
            "p_dtype": p_dtype_name,
            "symmetrize_every": symmetrize_every,
            "tile": tile,
            "batch_blocks": batch_blocks,
            "weight_order": weight_order,
            "kernel": kernel,
            "jitter": jitter,
        }
        super().__init__(params, defaults)

        group = self.param_groups[0]
        if group["tile"] is None:
            on_cuda = group["params"][0].device.type == "cuda"
            group["tile"] = DEFAULT_TILE_CUDA if on_cuda else DEFAULT_TILE
        numels = [p.numel() for p in group["params"]]
        self._blocks = partition_parameters(numels, block_size)
        if not self._blocks:
            raise ValueError("RLEKF got parameters with no elements")
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(
                f"RLEKF needs all parameters on one device, got {sorted(map(str, devices))}"
            )
        self._max_p_bytes = max_p_bytes
        # which 2-D parameters are flattened output-major: saved with the state, so a loaded
        # run keeps its layout even if the tags were lost (copy.deepcopy drops them)
        group["output_major_params"] = (
            _tagged(group["params"]) if weight_order != "storage" else []
        )
        self._perm = weight_permutation(group["params"], group["output_major_params"])
        self._groups: list[TileGroup] | None = None
        self._members: list[list[int]] = []  # local block positions of each group
        self._pending: list[_TileVectors | None] = []  # per group: V (B, n, k) or None
        self._last_flat_dw: Tensor | None = None
        self._index_cache: tuple[torch.device, list[tuple[Tensor, Tensor]]] | None = None
        anchor = self.state[group["params"][0]]
        anchor.update(
            {_LAM: lambda0, _N_UPDATES: 0, _N_SKIPPED: 0, _N_INDEF: 0, _LAST_A: math.nan}
        )
        self._check_memory()

    # ------------------------------------------------------------------ structure / memory
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the (single) parameter group; a second group raises ``ValueError``."""
        if len(self.param_groups) > 0:
            raise ValueError(
                "RLEKF supports exactly one parameter group: its blocks and the shared "
                "innovation scalar span all parameters. Pass all parameters in one group."
            )
        super().add_param_group(param_group)

    @staticmethod
    def estimate_p_bytes(
        numels: Sequence[int],
        block_size: int | None,
        p_dtype: torch.dtype | str = torch.float64,
        tile: int = DEFAULT_TILE,
    ) -> int:
        """Bytes that the stored ``P`` would take, without allocating anything.

        Args:
            numels: Number of elements of each parameter tensor, in registration order.
            block_size: Maximum block size, or ``None`` for one block (GEKF).
            p_dtype: Covariance dtype (``torch.float64``/``torch.float32`` or a string).
            tile: Tile edge of the stored triangle.

        Returns:
            ``itemsize * sum_i lower_tile_numel(n_i, tile)`` (about half of
            ``itemsize * sum_i n_i**2``).
        """
        itemsize = FLOAT_DTYPES[_resolve_p_dtype(p_dtype)].itemsize
        blocks = partition_parameters(numels, block_size)
        return itemsize * sum(lower_tile_numel(b.numel, tile) for b in blocks)

    def _local_p_bytes(self) -> int:
        """Bytes of the blocks this optimizer stores."""
        tile = self._group["tile"]
        return self.p_dtype.itemsize * sum(
            lower_tile_numel(self._blocks[i].numel, tile) for i in self._local_block_indices()
        )

    def _check_memory(self) -> None:
        """Refuse, with what it needs and why, a ``P`` above ``max_p_bytes``."""
        limit = self._max_p_bytes
        if limit is None:
            return
        need = self._local_p_bytes()
        group = self._group
        what = (
            f"RLEKF covariance P would need {need / _GIB:.2f} GiB in {group['p_dtype']} "
            f"({len(self._local_block_indices())} block(s) of {len(self._blocks)}, "
            f"N = {sum(b.numel for b in self._blocks)}, block_size = {group['block_size']}, "
            f"lower tiles of {group['tile']})"
        )
        if limit == "auto":
            device = group["params"][0].device
            avail = available_memory_bytes(device)
            if avail is None or need <= avail:
                return
            raise ValueError(
                f"{what}, more than the {avail / _GIB:.2f} GiB still available on {device}. "
                "Use a smaller block_size (P takes about itemsize * N * block_size / 2 bytes), "
                "p_dtype='float32', ShardedRLEKF on several ranks, or free memory."
            )
        if need > limit:
            raise ValueError(
                f"{what}, above max_p_bytes = {limit} ({limit / _GIB:.2f} GiB). "
                "Use a smaller block_size (P takes about itemsize * N * block_size / 2 bytes), "
                "p_dtype='float32', or raise max_p_bytes."
            )

    @property
    def _group(self) -> dict[str, Any]:
        return self.param_groups[0]

    @property
    def _anchor(self) -> dict[str, Any]:
        return self.state[self._group["params"][0]]

    @property
    def p_dtype(self) -> torch.dtype:
        """dtype of the stored covariance blocks."""
        return FLOAT_DTYPES[self._group["p_dtype"]]

    @property
    def weight_order(self) -> str:
        """``"output_major"`` or ``"storage"``: how 2-D weights are flattened into blocks."""
        return self._group["weight_order"]

    @property
    def kernel(self) -> str:
        """The sweep kernel in use: ``"fused"`` or ``"torch"`` (``"auto"`` resolved)."""
        choice = self._group.get("kernel", "auto")
        if choice != "auto":
            return choice
        on_cpu = self._group["params"][0].device.type == "cpu"
        return "fused" if on_cpu and tile_kernel.available() else "torch"

    @property
    def tile(self) -> int:
        """Tile edge of the stored triangles."""
        return int(self._group["tile"])

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The partition of the (flattened, :attr:`weight_order`) parameters into blocks."""
        return self._blocks

    @property
    def block_sizes(self) -> list[int]:
        """Block sizes ``[n_1, ..., n_L]`` in order."""
        return [b.numel for b in self._blocks]

    @property
    def p_numel(self) -> int:
        """Entries of the (logical) covariance blocks, ``sum_i n_i**2``."""
        return sum(b.numel**2 for b in self._blocks)

    @property
    def p_bytes(self) -> int:
        """Bytes of the stored covariance (all blocks' lower tiles; allocated at first use)."""
        tile = self._group["tile"]
        return self.p_dtype.itemsize * sum(lower_tile_numel(b.numel, tile) for b in self._blocks)

    @property
    def lam(self) -> float:
        """Current forgetting factor ``lambda_t``."""
        return float(self._anchor[_LAM])

    @property
    def n_updates(self) -> int:
        """Number of applied Kalman updates."""
        return int(self._anchor[_N_UPDATES])

    @property
    def n_skipped(self) -> int:
        """Number of updates skipped (non-finite error, gradient or innovation, or a block
        that lost definiteness)."""
        return int(self._anchor[_N_SKIPPED])

    @property
    def n_indefinite(self) -> int:
        """Number of skipped updates at which a block had lost definiteness (and was shifted)."""
        return int(self._anchor.get(_N_INDEF, 0))

    @property
    def last_innovation(self) -> float:
        """Innovation scalar ``a`` of the last update (``nan`` before the first one)."""
        return float(self._anchor[_LAST_A])

    @property
    def covariance(self) -> list[Tensor]:
        """The covariance blocks ``P_i`` of this optimizer as full ``(n_i, n_i)`` matrices.

        Copies (``c_i * S_i`` after applying any pending correction), in ``p_dtype``: for
        inspection and tests; they take ``sum_i n_i**2`` elements, twice the storage.
        """
        groups = self._storage()
        self.flush()
        out = []
        scales = self._anchor[_P_SCALE]
        for g, members in zip(groups, self._members, strict=True):
            for j, pos in enumerate(members):
                out.append((pos, g.dense(j).mul_(scales[pos])))
        return [t for _, t in sorted(out, key=lambda x: x[0])]

    def _local_block_indices(self) -> Sequence[int]:
        """Indices of the blocks whose ``P_i`` this optimizer holds (all of them here)."""
        return range(len(self._blocks))

    def _batch_limit(self) -> int | None:
        """Largest block size batched with its equal-size peers (``None``: any size)."""
        batch = self._group.get("batch_blocks")
        if batch is None:
            if self._group["params"][0].device.type == "cuda":
                return None
            return int(self._group["tile"])
        return None if batch else 0

    def _storage(self, loading: bool = False) -> list[TileGroup]:
        """The tile groups of this optimizer's blocks (allocated on first use; ``loading``:
        the loaded state still holds memory that is freed afterwards, so the "auto" limit is
        not checked then)."""
        if self._groups is None:
            if not (loading and self._max_p_bytes == "auto"):
                self._check_memory()
            group = self._group
            device = group["params"][0].device
            local = list(self._local_block_indices())
            sizes = [self._blocks[i].numel for i in local]
            self._members = group_blocks(sizes, self._batch_limit())
            kernel = self.kernel
            self._groups = [
                TileGroup(sizes[m[0]], len(m), group["tile"], self.p_dtype, device, 1.0, kernel)
                for m in self._members
            ]
            self._pending = [None] * len(self._groups)
            anchor = self._anchor
            packed: list[Tensor | None] = [None] * len(local)
            for g, members in zip(self._groups, self._members, strict=True):
                for j, pos in enumerate(members):
                    packed[pos] = g.packed(j)
            anchor[_P] = packed
            anchor[_P_SCALE] = [float(group["p0"])] * len(local)
        return self._groups

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the pending corrections (and a due symmetrisation) to the stored tiles.

        Called before the state is read (:meth:`state_dict`, :attr:`covariance`); the next
        update would otherwise do the same in its sweep, with the same kernels, so the bits
        of ``P`` do not depend on when the state was read.
        """
        if self._groups is None:
            return
        due = bool(self._anchor.get(_SYM_DUE, False))
        for gi, g in enumerate(self._groups):
            V = self._pending[gi]
            if V is not None:
                g.apply_(V)
                self._pending[gi] = None
            if due:
                g.symmetrize_diagonal_()
        self._anchor[_SYM_DUE] = False

    @torch.no_grad()
    def reset_covariance(self, p0: float | None = None) -> None:
        """Set every block this optimizer holds to ``P_i = p0 * I``.

        Pending corrections are dropped with the old tiles (they belong to the old ``P``);
        ``lambda``, the counters and the weights are kept. The blocks are allocated again
        (lower tiles of ``S_i = I``, scale ``c_i = p0``), in the stored ``p_dtype``.

        Args:
            p0: the new scale (a positive finite float); ``None``: the parameter group's
                ``p0``.
        """
        if p0 is None:
            p0 = self._group["p0"]
        p0 = _real("p0", p0, "a positive finite float", lambda v: 0.0 < v < math.inf)
        anchor = self._anchor
        self._groups = None
        self._pending = []
        self._index_cache = None
        anchor.pop(_P, None)
        anchor.pop(_P_SCALE, None)
        anchor[_SYM_DUE] = False
        self._storage()
        anchor[_P_SCALE] = [p0] * len(anchor[_P_SCALE])

    @torch.no_grad()
    def scale_covariance(self, factor: float) -> None:
        """Multiply every block this optimizer holds by ``factor``: ``P_i <- factor * P_i``.

        Exact in the stored representation ``P_i = c_i (S_i - V_i V_i^T)``: only the float64
        scales ``c_i`` change (pending corrections stay valid). Blocks not yet allocated are
        allocated first (``p0 * I``), so the scaled value is ``factor * p0 * I``.

        Args:
            factor: a positive finite float (``> 1`` inflates the covariance).
        """
        factor = _real("factor", factor, "a positive finite float", lambda v: 0.0 < v < math.inf)
        self._storage()
        scales = self._anchor[_P_SCALE]
        for i in range(len(scales)):
            scales[i] = scales[i] * factor

    # ------------------------------------------------------------------ update
    @torch.no_grad()
    def step(  # type: ignore[override]
        self,
        error: float | Tensor | None = None,
        closure: Callable[[], Any] | None = None,
        *,
        grads: Tensor | Sequence[Sequence[Tensor | None]] | None = None,
    ) -> Any:
        """Apply one Kalman update using the current ``.grad`` of the parameters as ``H``.

        With ``grads=...`` the call is forwarded to :meth:`step_k` (``error`` then holds the
        ``k`` errors); this lets a wrapper that only forwards ``step`` (Lightning's
        ``LightningOptimizer``, which counts global steps) drive a rank-k update.

        Args:
            error: Scalar error ``eps`` of the pseudo-measurement (label minus prediction,
                after the sign trick). If ``None``, the value returned by ``closure`` is used.
                A callable passed here is treated as the closure (``opt.step(closure)``).
            closure: Optional callable, run under ``torch.enable_grad()``, that recomputes
                the prediction, back-propagates it (setting ``.grad = H``) and returns the
                error (or a loss, when ``error`` is given).

        Returns:
            The closure's return value when a closure is given, otherwise ``error``.

        Raises:
            ValueError: If neither ``error`` nor ``closure`` is given, the error is not a
                scalar, or a gradient is sparse.
        """
        if closure is None and callable(error) and not isinstance(error, Tensor):
            closure, error = error, None
        result = None
        if closure is not None:
            with torch.enable_grad():
                result = closure()
        if error is None:
            if result is None:
                raise ValueError(
                    f"{type(self).__name__}.step needs error=... or a closure returning the error"
                )
            error = result
        if grads is not None:
            self.step_k(error, grads)
            return result if closure is not None else error
        if isinstance(error, Tensor) and error.numel() != 1:
            raise ValueError(f"RLEKF.step needs a scalar error, got shape {tuple(error.shape)}")
        self._update(float(error))
        return result if closure is not None else error

    def _update(self, eps: float) -> None:
        """One rank-1 update with ``H`` from ``.grad`` and the error ``eps``."""
        rows = self._reduce_rows(self._flat_grad().unsqueeze(0), False)
        errors = torch.tensor([eps], dtype=torch.float64)
        res = self._kalman(rows, errors, self.lam)
        self._finish(res, 1)

    def _flat_grad(self) -> Tensor:
        """``H`` over all parameters, ``(N,)`` in ``p_dtype``, in the optimizer's order."""
        params: list[Tensor] = self._group["params"]
        parts = []
        for p in params:
            g = p.grad
            if g is None:
                parts.append(torch.zeros(p.numel(), dtype=self.p_dtype, device=p.device))
            elif g.is_sparse:
                raise ValueError("RLEKF does not support sparse gradients")
            else:
                parts.append(_flat(g).to(self.p_dtype))
        flat = torch.cat(parts)
        return flat if self._perm is None else flat[self._perm]

    # The three reduction hooks are no-ops here; ShardedRLEKF sums over ranks.
    def _reduce_rows(self, rows: Tensor, given: bool) -> Tensor:
        """Gradient rows as used by every rank (``given``: the caller's tensor)."""
        return rows

    def _reduce_stats(self, stats: Tensor) -> None:
        """Sum the per-block statistics vector over the ranks (in place)."""

    def _reduce_increment(self, dw: Tensor) -> None:
        """Sum the zero-padded weight increment over the ranks (in place)."""

    def _n_ranks(self) -> int:
        return 1

    @torch.no_grad()
    def _kalman(self, rows: Tensor, errors: Tensor, lam: float) -> KalmanFactors:
        """One rank-``k`` update (``k = rows.shape[0]``; ``k = 1`` is the paper's step).

        ``rows`` ``(k, N)`` in ``p_dtype`` (optimizer order), ``errors`` ``(k,)`` float64 CPU.
        Steps: one sweep per group (pending correction + ``U = S H``), one host transfer of
        the per-block quadratic forms, the ``k x k`` algebra in float64
        (:func:`~rlekf.optim.functional.kalman_factors`), then increments, pending factors and
        scales. Returns the factors (``applied`` False when skipped).
        """
        k, n_total = rows.shape
        groups = self._storage()
        n_blocks = len(self._blocks)
        anchor = self._anchor
        symmetrize = bool(anchor.get(_SYM_DUE, False))
        device = rows.device
        index = self._group_index(device)

        # (1) one pass per group: apply the pending V, U = S H (rows (B, k, n) per group)
        swept = self._sweep_groups(rows, symmetrize=symmetrize)
        if symmetrize:
            anchor[_SYM_DUE] = False

        # (2) per-block H^T P H, |h|^2, the errors and a non-finite count: one vector, one
        # transfer to the host (zero-padded over all L blocks, summed over ranks if sharded)
        kk = k * k
        width = kk + k
        stats = torch.zeros(n_blocks * width + k + 1, dtype=torch.float64, device=device)
        per_block_dev = stats[: n_blocks * width].view(n_blocks, width)
        bad = torch.zeros((), dtype=torch.float64, device=device)
        for gi, members in enumerate(self._members):
            _, block_idx = index[gi]
            h, u, c = swept[gi]
            quads = torch.bmm(h, u.mT).mul_(c.view(-1, 1, 1))  # (B, k, k)
            row = torch.cat([quads.reshape(len(members), kk), (h * h).sum(2)], dim=1)
            per_block_dev.index_copy_(0, block_idx, row)
            bad = bad + (~torch.isfinite(h).all(2).all(1)).sum().to(torch.float64)
        stats[n_blocks * width : n_blocks * width + k] = errors.to(device)
        stats[-1] = bad
        self._reduce_stats(stats)
        host = stats.cpu()
        per_block = host[: n_blocks * width].view(n_blocks, width)
        quads = per_block[:, :kk].reshape(n_blocks, k, k)
        eps = host[n_blocks * width : n_blocks * width + k] / self._n_ranks()
        res = kalman_factors(quads, per_block[:, kk:], eps, lam, bool(host[-1] == 0))
        if not res.applied:
            if res.indefinite:
                self._repair(res)
            return res

        # (3) increments (zero-padded over all blocks, plus one slot that counts the blocks
        # whose diagonal the correction would drive negative), pending factors, then scales
        assert res.weight is not None and res.pending is not None
        weight = res.weight.to(device)
        pending = res.pending.to(device)
        dw = torch.zeros(n_total + 1, dtype=torch.float64, device=device)
        flags = []
        # below float64 only (where rounding can make P indefinite; float64 skips the second
        # host sync per update that the check costs)
        check = self.p_dtype != torch.float64
        for gi, g in enumerate(groups):
            flat_idx, _ = index[gi]
            _, u, c = swept[gi]
            # dw_i = c_i U_i w (U_i = S_i H_i, stored (k, n)); V_i = sqrt(c_i) U_i pending
            dw.index_copy_(0, flat_idx, torch.matmul(weight, u).mul_(c.view(-1, 1)).reshape(-1))
            V = g.vectors(k)  # the previous pending buffer of this k was applied above
            V.buf.copy_(torch.matmul(pending.mT, u).mul_(c.sqrt().view(-1, 1, 1)))
            if check:
                flag = negative_diagonal(g.diagonal(), V.buf, g.dtype)
                flags.append(flag)
                dw[-1] += flag.sum()
        self._reduce_increment(dw)  # one collective when sharded: increments and the count
        if check and float(dw[-1]) > 0:
            # P lost definiteness where H^T P H does not show it (the downdate would make a
            # diagonal entry negative): skip the update on every rank, repair those blocks
            local = self._local_block_indices()
            bad = [
                local[pos]
                for flag, members in zip(flags, self._members, strict=True)
                for pos, f in zip(members, flag.tolist(), strict=True)
                if f
            ]
            res = res._replace(
                applied=False,
                weight=None,
                pending=None,
                indefinite=tuple(bad),
                repair=(0.0,) * len(bad),
            )
            self._repair(res)
            return res
        scales = anchor[_P_SCALE]
        for gi, (g, members) in enumerate(zip(groups, self._members, strict=True)):
            for pos in members:
                scales[pos] = scales[pos] / lam
            self._pending[gi] = g.vectors(k)
        dw = dw[:n_total]
        self._last_flat_dw = dw
        self._add_flat(dw)
        return res

    def _group_index(self, device: torch.device) -> list[tuple[Tensor, Tensor]]:
        """Per group: the flat positions of its blocks' entries (``(B * n,)``, block by
        block) and the indices of its blocks among all ``L`` blocks (``(B,)``)."""
        cached = self._index_cache
        if cached is not None and cached[0] == device:
            return cached[1]
        local = list(self._local_block_indices())
        out = []
        for g, members in zip(self._storage(), self._members, strict=True):
            offsets = [self._blocks[local[pos]].offset for pos in members]
            flat = torch.cat([torch.arange(o, o + g.n) for o in offsets]).to(device)
            blocks = torch.tensor([local[pos] for pos in members]).to(device)
            out.append((flat, blocks))
        self._index_cache = (device, out)
        return out

    def _repair(self, res: KalmanFactors) -> None:
        """Shift the local blocks that lost definiteness: ``S_i <- S_i + delta_i I``."""
        local = {i: pos for pos, i in enumerate(self._local_block_indices())}
        where = {}
        for gi, members in enumerate(self._members):
            for j, pos in enumerate(members):
                where[pos] = (gi, j)
        groups = self._storage()
        scales = self._anchor[_P_SCALE]
        for i, delta in zip(res.indefinite, res.repair, strict=True):
            if i in local:
                gi, j = where[local[i]]
                g = groups[gi]
                # at least the rounding level of the stored S: a smaller shift leaves the
                # negative direction in place, and later updates amplify it (README)
                shift = max(delta / scales[local[i]], _rounding_floors(g)[j])
                g.add_diagonal_(j, shift)
                log.warning(
                    "RLEKF: block %d lost positive definiteness (H^T P H < 0, or a downdated "
                    "diagonal entry < 0); update skipped, P shifted by %.3g * I",
                    i,
                    shift * scales[local[i]],
                )
        self._anchor[_N_INDEF] = self.n_indefinite + 1

    def _add_flat(self, dw: Tensor) -> None:
        """Add a flat increment (optimizer order, ``(N,)``) to the parameters."""
        if self._perm is not None:
            storage = torch.empty_like(dw)
            storage[self._perm] = dw
            dw = storage
        params: list[Tensor] = self._group["params"]
        off = 0
        for p in params:
            n = p.numel()
            inc = dw[off : off + n]
            if p.is_contiguous():
                p.view(-1).add_(inc)
            else:
                p.add_(inc.view(p.shape))
            off += n

    def _finish(self, res: KalmanFactors, k: int) -> None:
        """Counters and ``lambda`` after an update of ``k`` measurements."""
        anchor = self._anchor
        anchor[_LAST_A] = float(res.innovation.diagonal().mean())
        if not res.applied:
            anchor[_N_SKIPPED] = int(anchor[_N_SKIPPED]) + k
            return
        lam = float(anchor[_LAM])
        before = int(anchor[_N_UPDATES])
        anchor[_N_UPDATES] = n = before + k
        every = int(self._group["symmetrize_every"])
        if every and n // every > before // every:
            anchor[_SYM_DUE] = True  # done by the next sweep (or flush)
            self._add_jitter()
        nu_k = self._group["nu"] ** k
        anchor[_LAM] = nu_k * lam + 1.0 - nu_k  # = 1 - (1 - lam) nu^k; k = 1: nu*lam + 1 - nu

    @torch.no_grad()
    def _add_jitter(self) -> None:
        """``S_i <- S_i + jitter * rounding_floor(max diag(S_i)) * I`` for the local blocks
        (right after an update, with its correction still pending: the same bits whether or
        not the state is flushed before the next update)."""
        factor = self.jitter
        if not factor or self._groups is None:
            return
        for g in self._groups:
            for j, floor in enumerate(_rounding_floors(g)):
                g.add_diagonal_(j, factor * floor)

    @property
    def jitter(self) -> float:
        """The factor of the periodic diagonal shift (``"auto"`` resolved by ``p_dtype``)."""
        value = self._group.get("jitter", "auto")
        if value == "auto":
            return 0.0 if self.p_dtype == torch.float64 else 1.0
        return float(value)

    def _gradient_rows(self, grads: Tensor | Sequence[Sequence[Tensor | None]], k: int) -> Tensor:
        """The ``(k, N)`` matrix of measurement gradients in ``p_dtype``, optimizer order."""
        params: list[Tensor] = self._group["params"]
        n_total = sum(p.numel() for p in params)
        device = params[0].device
        if isinstance(grads, Tensor):
            if grads.dim() == 1 and k == 1:
                grads = grads.unsqueeze(0)
            if tuple(grads.shape) != (k, n_total):
                raise ValueError(
                    f"RLEKF.step_k: grads has shape {tuple(grads.shape)}, expected "
                    f"({k}, {n_total}) (k errors x all parameters, flattened in order)"
                )
            if grads.is_sparse:
                raise ValueError("RLEKF does not support sparse gradients")
            rows = grads.detach().to(device=device, dtype=self.p_dtype)
        else:
            grads = list(grads)
            if len(grads) != k:
                raise ValueError(f"RLEKF.step_k: got {k} errors but {len(grads)} gradient sets")
            rows = torch.zeros(k, n_total, dtype=self.p_dtype, device=device)
            for j, gset in enumerate(grads):
                gset = list(gset)
                if len(gset) != len(params):
                    raise ValueError(
                        f"RLEKF.step_k: gradient set {j} has {len(gset)} tensors, "
                        f"expected one per parameter ({len(params)})"
                    )
                off = 0
                for p, g in zip(params, gset, strict=True):
                    if g is not None:
                        if g.is_sparse:
                            raise ValueError("RLEKF does not support sparse gradients")
                        if g.numel() != p.numel():
                            raise ValueError(
                                f"RLEKF.step_k: gradient set {j} has a tensor of shape "
                                f"{tuple(g.shape)} for a parameter of shape {tuple(p.shape)}"
                            )
                        rows[j, off : off + p.numel()].copy_(_flat(g.detach()))
                    off += p.numel()
        return rows if self._perm is None else rows[:, self._perm]

    @torch.no_grad()
    def step_k(
        self,
        errors: Sequence[float] | Tensor,
        grads: Tensor | Sequence[Sequence[Tensor | None]],
    ) -> RLEKFRankKUpdate:
        r"""Apply ONE rank-``k`` update for ``k`` measurements taken at the current weights.

        This is the opt-in "fused" mode: one pass over ``P`` for all ``k`` measurements, with
        the shared ``k x k`` innovation matrix ``A = L*lambda*I_k + sum_i H_i^T P_i H_i``
        (the algebra of :func:`~rlekf.optim.rlekf_update_rank_k`). ``.grad`` is neither read
        nor written.

        Differences from ``k`` calls of :meth:`step` (the paper's algorithm):

        * all ``k`` measurements are linearized at the same weights (no fresh forward pass
          between them); the update is the joint (batch) Kalman update for them, which for
          one block and ``lambda = 1`` equals ``k`` sequential updates of the linearized model;
          with several blocks the cross-block correlations that one measurement creates are
          seen by the others (the paper drops them after every measurement);
        * forgetting is applied once, with the product of the ``k`` factors the paper would
          use, ``lambda_eff = lambda_t * lambda_{t+1} * ... * lambda_{t+k-1}`` (the same total
          inflation of ``P``), and the measurement noise is ``L * lambda_eff`` for all ``k``;
        * the schedule then advances by ``k`` measurements,
          ``lambda <- 1 - (1 - lambda) * nu**k``, i.e. ``lambda`` is the same function of
          :attr:`n_updates` as in the paper (``1 - lambda_t = (1 - lambda_1) nu^(t-1)``).

        Counters: an applied call adds ``k`` to :attr:`n_updates`; a skipped one (non-finite
        errors, gradients or ``A``, ``A`` not positive definite, or a block that lost
        definiteness) adds ``k`` to :attr:`n_skipped` and leaves the weights and ``lambda``
        untouched. :attr:`last_innovation` becomes ``tr(A) / k`` (``a`` itself for ``k = 1``).

        Args:
            errors: The ``k`` errors ``eps_j`` (after the sign trick): a sequence of floats or
                a ``(k,)`` tensor.
            grads: Either a ``(k, N)`` tensor whose row ``j`` is ``H_j`` over all parameters,
                each flattened as ``p.reshape(-1)`` and concatenated in parameter order, or a
                sequence of ``k`` gradient sets, each one tensor (or ``None`` for zero) per
                parameter, as returned by ``torch.autograd.grad(..., allow_unused=True)``.

        Returns:
            The :class:`~rlekf.optim.RLEKFRankKUpdate` (innovation matrix, whether applied,
            the per-block increments in the optimizer's order).

        Raises:
            ValueError: On mismatched shapes or sparse gradients.
        """
        if isinstance(errors, Tensor):
            eps = errors.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
        else:  # Python floats: float64, not the default dtype
            eps = torch.as_tensor([float(e) for e in errors], dtype=torch.float64)
        k = eps.numel()
        if k == 0:
            raise ValueError("RLEKF.step_k needs at least one error")
        rows = self._gradient_rows(grads, k)
        rows = self._reduce_rows(rows, isinstance(grads, Tensor))
        res = self._kalman(rows, eps, self._lam_product(k))
        self._finish(res, k)
        increments: tuple[Tensor, ...] = ()
        if res.applied:
            increments = tuple(self._last_increments())
        return RLEKFRankKUpdate(res.innovation, res.applied, increments)

    def _last_increments(self) -> list[Tensor]:
        """Per-block increments of the last applied update (from the stored scatter)."""
        dw = self._last_flat_dw
        if dw is None:
            return []
        return [dw[b.offset : b.offset + b.numel] for b in self._blocks]

    def _lam_product(self, k: int) -> float:
        """``lambda_t * ... * lambda_{t+k-1}``: the factors ``k`` paper updates would use."""
        lam = float(self._anchor[_LAM])
        nu = self._group["nu"]
        return math.prod([lam] + [1.0 - (1.0 - lam) * nu**j for j in range(1, k)])

    # ------------------------------------------------------------------ uncertainty
    @torch.no_grad()
    def predictive_variance(self, grads: Tensor | Sequence[Sequence[Tensor | None]]) -> Tensor:
        r"""Quadratic forms ``g_j^T P g_j = sum_i g_{j,i}^T P_i g_{j,i}`` of ``k`` gradients.

        With ``g_j = dy_j/dw`` of a model output ``y_j`` this is the linearised predictive
        variance of ``y_j`` under the block-diagonal weight covariance ``P`` (in the units of
        ``y_j`` squared, times the scale of the pseudo-measurements ``P`` was trained with).
        Reads ``P`` only: weights, ``lambda`` and the counters are untouched. A sharded
        optimizer sums the local blocks over the ranks (every rank passes the same
        gradients; the call is collective).

        Args:
            grads: ``(k, N)`` or ``(N,)`` tensor of gradients over all parameters, flattened
                in parameter order, or ``k`` gradient sets (one tensor or ``None`` per
                parameter), as for :meth:`step_k`.

        Returns:
            ``(k,)`` float64 tensor on the CPU.
        """
        if isinstance(grads, Tensor):
            k = 1 if grads.dim() == 1 else int(grads.shape[0])
        else:
            grads = list(grads)
            k = len(grads)
        if k == 0:
            raise ValueError("RLEKF.predictive_variance needs at least one gradient")
        rows = self._gradient_rows(grads, k)
        out = torch.zeros(k, dtype=torch.float64, device=rows.device)
        for h, u, c in self._sweep_groups(rows):
            out += ((h * u).sum(2) * c.unsqueeze(1)).sum(0)  # sum over blocks of (B, k)
        self._reduce_stats(out)
        return out.cpu()

    def _sweep_groups(
        self, rows: Tensor, symmetrize: bool = False
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """One pass over each group's storage: apply the pending correction, ``U = S H``.

        Args:
            rows: ``(k, N)`` gradient rows in ``p_dtype`` (optimizer order).
            symmetrize: re-symmetrise the diagonal tiles in the same pass.

        Returns:
            per group ``(H, U, c)``: ``H`` and ``U`` ``(B, k, n)`` float64 (``B`` blocks of
            ``n`` parameters), ``c`` ``(B,)`` float64 the blocks' scales (``P_i = c_i S_i``).
        """
        k = rows.shape[0]
        groups = self._storage()  # allocates P (and its scales) on first use
        scales = self._anchor[_P_SCALE]
        index = self._group_index(rows.device)
        out = []
        for gi, (g, members) in enumerate(zip(groups, self._members, strict=True)):
            Hk = rows.index_select(1, index[gi][0]).view(k, g.count, g.n).transpose(0, 1)
            Y = g.sweep_rows_(Hk, self._pending[gi], symmetrize=symmetrize)
            self._pending[gi] = None
            c = torch.tensor([scales[pos] for pos in members], dtype=torch.float64)
            out.append((Hk.to(torch.float64), Y.to(torch.float64, copy=True), c.to(rows.device)))
        return out

    # ------------------------------------------------------------------ logging
    @torch.no_grad()
    def kalman_stats(self) -> dict[str, Any]:
        """Scalars for logging.

        Returns:
            ``{"lambda", "n_updates", "n_skipped", "n_indefinite", "last_innovation",
            "block_sizes", "trace", "min_diag"}``; ``trace`` and ``min_diag`` are per-block
            lists of ``tr(P_i)`` and ``min(diag(P_i))``.
        """
        values = self._diag_stats()
        return {
            "lambda": self.lam,
            "n_updates": self.n_updates,
            "n_skipped": self.n_skipped,
            "n_indefinite": self.n_indefinite,
            "last_innovation": self.last_innovation,
            "block_sizes": self.block_sizes,
            "trace": [v[0] for v in values],
            "min_diag": [v[1] for v in values],
        }

    def _local_diag(self) -> list[Tensor]:
        """``diag(P_i)`` (float64) of the local blocks, pending corrections included."""
        groups = self._storage()
        scales = self._anchor[_P_SCALE]
        out: list[Tensor | None] = [None] * len(scales)
        for gi, (g, members) in enumerate(zip(groups, self._members, strict=True)):
            d = g.diagonal().to(torch.float64)
            V = self._pending[gi]
            if V is not None:
                d = d - (V.buf.to(torch.float64) ** 2).sum(1)
            for j, pos in enumerate(members):
                out[pos] = d[j] * scales[pos]
        return [t for t in out if t is not None]

    def _diag_stats(self) -> list[list[float]]:
        """``[tr(P_i), min(diag(P_i))]`` of every block, in block order."""
        return torch.stack([torch.stack([d.sum(), d.min()]) for d in self._local_diag()]).tolist()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: ``lambda``, counters and, under ``"P"``, every stored block.

        ``state[anchor]["P"]`` holds each block's packed lower tiles (1-D, ``p_dtype``, see
        :func:`~rlekf.optim.tiled.pack_lower_tiles`) and ``state[anchor]["P_scale"]`` the
        float64 scales, so ``P_i = P_scale[i] * unpack(P[i])``; the tile edge and the weight
        order are in the parameter group. Pending corrections are applied first.
        """
        self.flush()
        return super().state_dict()

    def _saved_anchor(self, state_dict: dict[str, Any]) -> tuple[dict, Any, dict]:
        """Check that ``state_dict`` is an RLEKF state dict for these parameters.

        Returns:
            (saved ``state``, id of the anchor parameter, the anchor's saved state).
        """
        groups = state_dict.get("param_groups", [])
        if len(groups) != 1:
            raise ValueError(
                f"RLEKF state dict must have exactly one parameter group, got {len(groups)}"
            )
        saved_ids = groups[0]["params"]
        if len(saved_ids) != len(self._group["params"]):
            raise ValueError(
                f"RLEKF state dict has {len(saved_ids)} parameters, "
                f"this optimizer has {len(self._group['params'])}"
            )
        anchor_id = saved_ids[0]
        saved_state = state_dict.get("state", {})
        saved_anchor = saved_state.get(anchor_id)
        if saved_anchor is None or _LAM not in saved_anchor:
            raise ValueError("not an RLEKF state dict (no 'lam' entry under the first parameter)")
        return saved_state, anchor_id, saved_anchor

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, keeping ``P`` in its own dtype.

        Also loads the state dicts of earlier versions (full ``(n_i, n_i)`` blocks under
        ``"P"``, no ``weight_order``: they keep the order they were written with,
        ``"storage"``). The covariance is restored in the loaded ``p_dtype`` on the
        parameters' device, bit-exact; ``lambda`` and the counters are Python scalars.

        Raises:
            ValueError: If the state dict is not an RLEKF state dict or its block sizes do
                not match this optimizer's.
        """
        saved_state, anchor_id, saved_anchor = self._saved_anchor(state_dict)
        saved_p = saved_anchor.get(_P)
        tile = int(state_dict["param_groups"][0].get("tile", self.tile))
        if saved_p is not None:
            self._check_layout(
                saved_p,
                tile,
                "Use the same parameters (in the same order) and block_size as the run that "
                "saved it.",
            )
        self._restore(dict(state_dict), saved_state, anchor_id, saved_anchor, saved_p)

    def _check_layout(self, saved_p: Sequence[Tensor], tile: int, advice: str) -> None:
        """Raise ``ValueError`` unless ``saved_p`` are blocks of :attr:`block_sizes` (packed
        lower tiles of edge ``tile``, or full square matrices of earlier versions)."""
        found: list[Any] = []
        for t in saved_p:
            n = None
            if t.dim() == 2 and t.shape[0] == t.shape[1]:
                n = int(t.shape[0])
            elif t.dim() == 1:
                n = packed_block_size(t.numel(), tile)
            found.append(tuple(t.shape) if n is None else n)
        if found != self.block_sizes:
            raise ValueError(
                "RLEKF state dict block layout does not match: expected block sizes "
                f"{self.block_sizes}, found {found}. {advice}"
            )

    def _restore(
        self,
        top: dict[str, Any],
        saved_state: dict,
        anchor_id: Any,
        saved_anchor: dict,
        blocks: Sequence[Tensor] | None,
        scales: Sequence[float] | None = None,
    ) -> None:
        """Load ``top`` with the anchor's ``P`` taken out, then set ``P`` to ``blocks``.

        The base class gets a shallow copy without ``P``, so it does not cast ``P`` to the
        parameters' dtype; ``blocks`` (this optimizer's local blocks, in order: packed lower
        tiles, or full matrices of earlier versions) are stored in the loaded ``p_dtype`` on
        the parameters' device. ``blocks=None`` leaves ``P`` unallocated.
        """
        if scales is None:
            scales = saved_anchor.get(_P_SCALE)
        stripped_anchor = {k: v for k, v in saved_anchor.items() if k not in (_P, _P_SCALE)}
        top["state"] = {**saved_state, anchor_id: stripped_anchor}
        mine = {k: self._group[k] for k in ("tile", "batch_blocks", "kernel")}
        Optimizer.load_state_dict(self, top)

        group = self._group
        group["p_dtype"] = _resolve_p_dtype(group.get("p_dtype", "float64"))
        group.setdefault("tile", mine["tile"])  # packed blocks keep their saved tile
        group["batch_blocks"] = mine["batch_blocks"]  # runtime choices of this process
        group["kernel"] = mine["kernel"]
        # written before weight_order existed: the order of that run
        group.setdefault("weight_order", "storage")
        if "output_major_params" not in group:
            transposed = _tagged(group["params"]) if group["weight_order"] != "storage" else []
            group["output_major_params"] = transposed
        self._anchor.setdefault(_N_INDEF, 0)
        self._perm = weight_permutation(group["params"], group["output_major_params"])
        self._groups = None
        self._index_cache = None
        self._pending = []
        if blocks is None:
            return
        groups = self._storage(loading=True)
        anchor = self._anchor
        local = list(self._local_block_indices())
        if scales is None:
            scales = [1.0] * len(local)
        anchor[_P_SCALE] = [float(c) for c in scales]
        tile = int(group["tile"])
        device = group["params"][0].device
        for g, members in zip(groups, self._members, strict=True):
            for j, pos in enumerate(members):
                t = blocks[pos].detach().to(device=device, dtype=self.p_dtype)
                if t.dim() == 2:  # a full block of an earlier version
                    t = pack_lower_tiles(t, tile)
                g.load_(j, t)
