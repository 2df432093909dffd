"""RLEKF as a :class:`torch.optim.Optimizer`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from rlekf.optim.functional import (
    RLEKFRankKUpdate,
    rlekf_update,
    rlekf_update_rank_k,
    symmetrize_,
)
from rlekf.optim.partition import Block, partition_parameters, validate_block_size

__all__ = ["RLEKF"]

_GIB = float(1 << 30)
_P_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_P_DTYPE_ALIASES = {
    "float64": "float64",
    "double": "float64",
    "torch.float64": "float64",
    "fp64": "float64",
    "float32": "float32",
    "float": "float32",
    "torch.float32": "float32",
    "fp32": "float32",
}
# symmetrize_every=None: every 100 updates for both dtypes. Without it a float32 P loses
# symmetry and definiteness within ~1000 updates, and a float64 P reaches ~1e-3 relative
# asymmetry after ~3000 strongly exciting updates (forgetting inflates the rounding residue);
# the cost is 1-2 % of the update time (see functional.symmetrize_).
_AUTO_SYMMETRIZE = {"float64": 100, "float32": 100}
# Keys of the state held under the anchor parameter (the first parameter of the group).
_LAM, _N_UPDATES, _N_SKIPPED, _LAST_A, _P = "lam", "n_updates", "n_skipped", "last_innovation", "P"


def _resolve_p_dtype(p_dtype: torch.dtype | str) -> str:
    """Canonical name (``"float64"`` or ``"float32"``) of a covariance dtype."""
    if isinstance(p_dtype, torch.dtype):
        name = str(p_dtype).removeprefix("torch.")
        if name in _P_DTYPES:
            return name
    elif isinstance(p_dtype, str) and p_dtype.strip().lower() in _P_DTYPE_ALIASES:
        return _P_DTYPE_ALIASES[p_dtype.strip().lower()]
    raise ValueError(
        f"Invalid p_dtype: {p_dtype!r} (expected torch.float64 or torch.float32, "
        "or the strings 'float64'/'float32')"
    )


def _real(name: str, value: Any, expected: str, ok: Callable[[float], bool]) -> float:
    """Validate a real hyperparameter and return it as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    v = float(value)
    if not ok(v):
        raise ValueError(f"Invalid {name}: {value!r} (expected {expected})")
    return v


def _flat(t: Tensor) -> Tensor:
    """``t.reshape(-1)``; a view for contiguous tensors."""
    return t.view(-1) if t.is_contiguous() else t.reshape(-1)


class RLEKF(Optimizer):
    r"""Reorganized-layer extended Kalman filter (RLEKF, Hu et al., AAAI 2023).

    The flattened parameters ``w`` (each tensor as ``p.reshape(-1)``, in registration order)
    are cut into ``L`` contiguous blocks by the "gather small, split big" rule
    (:func:`~rlekf.optim.partition_parameters`). The covariance is block diagonal,
    ``P = diag(P_1, ..., P_L)`` with ``P_i = p0 * I`` initially. One call to :meth:`step`
    consumes one scalar pseudo-measurement with error :math:`\varepsilon` and gradient
    ``H = p.grad`` (the caller back-propagates the signed, scaled prediction):

    .. math::

        a &= L\lambda_t + \textstyle\sum_i H_i^\top P_i H_i \quad\text{(one shared scalar)}\\
        K_i &= P_i H_i, \qquad w_i \leftarrow w_i + (\varepsilon / a) K_i\\
        P_i &\leftarrow (P_i - K_i K_i^\top / a) / \lambda_t\\
        \lambda_{t+1} &= \nu \lambda_t + 1 - \nu

    :meth:`step_k` is an opt-in "fused" variant that absorbs ``k`` measurements taken at
    the same weights in one rank-``k`` update (one pass over ``P``; see its docstring for
    how it differs from ``k`` calls of :meth:`step`).

    ``P`` is kept in ``p_dtype`` independently of the model dtype (a float32 model with a
    float64 ``P`` is supported: ``H`` is cast to ``p_dtype`` and the increments are added
    back into the parameters). Updates with a non-finite error, gradient or innovation are
    skipped and counted in :attr:`n_skipped`; ``P``, the weights and ``lambda`` are left
    untouched.

    Memory: ``P`` holds ``sum_i n_i**2 <= N * block_size`` elements; see
    :meth:`estimate_p_bytes` and ``max_p_bytes``.

    Args:
        params: Parameters to optimize (one parameter group only, since the blocks and the
            innovation scalar span all of them). Every parameter must be on the same device.
        block_size: Maximum block size ``N_b`` (default 5120, as in PWMLFF and DeePMD-kit);
            ``None`` gives one block, i.e. the global EKF (GEKF).
        lambda0: Initial forgetting factor ``lambda_1`` in ``(0, 1]`` (default 0.98).
        nu: Growth rate of ``lambda`` in ``(0, 1]`` (default 0.9987); ``lambda0 = nu = 1``
            gives recursive least squares.
        p0: Initial covariance scale, ``P_0 = p0 * I`` (default 1.0; PWMLFF now uses 0.01).
        p_dtype: dtype of ``P``: ``torch.float64`` (default) or ``torch.float32``; the
            strings ``"float64"``/``"float32"`` are accepted (Hydra configs).
        symmetrize_every: Replace ``P_i`` by ``(P_i + P_i^T)/2`` every this many applied
            updates; 0 disables it (the paper's algorithm). ``None`` (default) picks 100 for
            both dtypes (see :func:`~rlekf.optim.symmetrize_`: float32 loses symmetry and
            definiteness without it; in float64 the relative asymmetry reaches ~1e-7 after
            1000 and ~1e-3 after 3000 strongly exciting updates).
        max_p_bytes: Refuse (``ValueError``) to build an optimizer whose ``P`` would take more
            than this many bytes; ``None`` (default) means no limit.

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
        max_p_bytes: int | None = None,
    ) -> None:
        block_size = validate_block_size(block_size)
        lambda0 = _real("lambda0", lambda0, "0 < lambda0 <= 1", lambda v: 0.0 < v <= 1.0)
        nu = _real("nu", nu, "0 < nu <= 1", lambda v: 0.0 < v <= 1.0)
        p0 = _real("p0", p0, "a positive finite float", lambda v: 0.0 < v < math.inf)
        p_dtype_name = _resolve_p_dtype(p_dtype)
        if symmetrize_every is None:
            symmetrize_every = _AUTO_SYMMETRIZE[p_dtype_name]
        if (
            isinstance(symmetrize_every, bool)
            or not isinstance(symmetrize_every, int)
            or symmetrize_every < 0
        ):
            raise ValueError(
                f"Invalid symmetrize_every: {symmetrize_every!r} (expected int >= 0 or None)"
            )
        if max_p_bytes is not None and (
            isinstance(max_p_bytes, bool) or not isinstance(max_p_bytes, int) or max_p_bytes <= 0
        ):
            raise ValueError(f"Invalid max_p_bytes: {max_p_bytes!r} (expected int > 0 or None)")

        defaults = {
            "block_size": block_size,
            "lambda0": lambda0,
            "nu": nu,
            "p0": p0,
            "p_dtype": p_dtype_name,
            "symmetrize_every": symmetrize_every,
        }
        super().__init__(params, defaults)

        group = self.param_groups[0]
        numels = [p.numel() for p in group["params"]]
        self._blocks = partition_parameters(numels, block_size)
        if not self._blocks:
            raise ValueError("RLEKF got parameters with no elements")
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(
                f"RLEKF needs all parameters on one device, got {sorted(map(str, devices))}"
            )
        if max_p_bytes is not None:
            need = self.estimate_p_bytes(numels, block_size, p_dtype_name)
            if need > max_p_bytes:
                raise ValueError(
                    f"RLEKF covariance P would need {need / _GIB:.2f} GiB in {p_dtype_name} "
                    f"({len(self._blocks)} block(s), N = {sum(numels)}, "
                    f"block_size = {block_size}), "
                    f"above max_p_bytes = {max_p_bytes} ({max_p_bytes / _GIB:.2f} GiB). "
                    "Use a smaller block_size (P takes about itemsize * N * block_size bytes), "
                    "p_dtype='float32', or raise max_p_bytes."
                )
        self._work: list[tuple[Tensor, Tensor]] | None = None  # per-block H and K buffers
        anchor = self.state[group["params"][0]]
        anchor.update({_LAM: lambda0, _N_UPDATES: 0, _N_SKIPPED: 0, _LAST_A: math.nan})

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
        numels: Sequence[int], block_size: int | None, p_dtype: torch.dtype | str = torch.float64
    ) -> int:
        """Bytes that ``P`` would take, without allocating anything.

        Args:
            numels: Number of elements of each parameter tensor, in registration order.
            block_size: Maximum block size, or ``None`` for one block (GEKF).
            p_dtype: Covariance dtype (``torch.float64``/``torch.float32`` or a string).

        Returns:
            ``itemsize * sum_i n_i**2``.
        """
        itemsize = _P_DTYPES[_resolve_p_dtype(p_dtype)].itemsize
        return itemsize * sum(b.numel**2 for b in partition_parameters(numels, block_size))

    @property
    def _group(self) -> dict[str, Any]:
        return self.param_groups[0]

    @property
    def _anchor(self) -> dict[str, Any]:
        return self.state[self._group["params"][0]]

    @property
    def p_dtype(self) -> torch.dtype:
        """dtype of the covariance blocks."""
        return _P_DTYPES[self._group["p_dtype"]]

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The partition of the parameters into blocks."""
        return self._blocks

    @property
    def block_sizes(self) -> list[int]:
        """Block sizes ``[n_1, ..., n_L]`` in order."""
        return [b.numel for b in self._blocks]

    @property
    def p_numel(self) -> int:
        """Elements in all covariance blocks, ``sum_i n_i**2``."""
        return sum(b.numel**2 for b in self._blocks)

    @property
    def p_bytes(self) -> int:
        """Bytes of all covariance blocks (allocated at the first step)."""
        return self.p_numel * self.p_dtype.itemsize

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
        """Number of updates skipped because of a non-finite error, gradient or innovation."""
        return int(self._anchor[_N_SKIPPED])

    @property
    def last_innovation(self) -> float:
        """Innovation scalar ``a`` of the last update (``nan`` before the first one)."""
        return float(self._anchor[_LAST_A])

    @property
    def covariance(self) -> list[Tensor]:
        """The covariance blocks ``P_i`` (allocated on first access)."""
        return self._covariance()

    def _local_block_indices(self) -> Sequence[int]:
        """Indices of the blocks whose ``P_i`` this optimizer holds (all of them here)."""
        return range(len(self._blocks))

    def _covariance(self) -> list[Tensor]:
        anchor = self._anchor
        if _P not in anchor:
            group = self._group
            device = group["params"][0].device
            anchor[_P] = [
                torch.eye(self._blocks[i].numel, dtype=self.p_dtype, device=device).mul_(
                    group["p0"]
                )
                for i in self._local_block_indices()
            ]
        return anchor[_P]

    def _buffers(self, P: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        ref = P[0]
        if (
            self._work is None
            or self._work[0][0].dtype != ref.dtype
            or (self._work[0][0].device != ref.device)
        ):
            self._work = [
                (
                    torch.empty(b.numel, dtype=ref.dtype, device=ref.device),
                    torch.empty(b.numel, dtype=ref.dtype, device=ref.device),
                )
                for b in self._blocks
            ]
        return self._work

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
        params: list[Tensor] = self._group["params"]
        P = self._covariance()
        work = self._buffers(P)

        # Gather H_i = grad[segments] into the preallocated p_dtype buffers.
        grads = []
        for p in params:
            g = p.grad
            if g is not None and g.is_sparse:
                raise ValueError("RLEKF does not support sparse gradients")
            grads.append(None if g is None else _flat(g))
        H: list[Tensor] = []
        for block, (h, _) in zip(self._blocks, work, strict=True):
            off = 0
            for seg in block.segments:
                dst = h[off : off + seg.numel]
                g = grads[seg.param_index]
                if g is None:
                    dst.zero_()
                else:
                    dst.copy_(g[seg.start : seg.stop])
                off += seg.numel
            H.append(h)

        res = rlekf_update(None, P, H, eps, self.lam, out=[k for _, k in work])
        self._finish_1(res.innovation, res.increments if res.applied else None, P)

    def _finish_1(
        self, innovation: float, increments: Sequence[Tensor] | None, P: Sequence[Tensor]
    ) -> None:
        """Bookkeeping after a rank-1 update: weights, counters, lambda, symmetrisation.

        Args:
            innovation: The innovation scalar ``a`` (stored as :attr:`last_innovation`).
            increments: The per-block weight increments, or ``None`` for a skipped update.
            P: This optimizer's covariance blocks (symmetrised periodically).
        """
        group = self._group
        anchor = self._anchor
        anchor[_LAST_A] = innovation
        if increments is None:
            anchor[_N_SKIPPED] = int(anchor[_N_SKIPPED]) + 1
            return
        self._scatter(increments)
        lam = float(anchor[_LAM])
        anchor[_N_UPDATES] = n = int(anchor[_N_UPDATES]) + 1
        nu = group["nu"]
        anchor[_LAM] = nu * lam + 1.0 - nu
        every = group["symmetrize_every"]
        if every and n % every == 0:
            for p_i in P:
                symmetrize_(p_i)

    def _scatter(self, increments: Sequence[Tensor]) -> None:
        """Add the per-block increments to the parameters (cast to their dtype by add_)."""
        params: list[Tensor] = self._group["params"]
        flats: dict[int, Tensor] = {}
        for block, inc in zip(self._blocks, increments, strict=True):
            off = 0
            for seg in block.segments:
                idx = seg.param_index
                if idx not in flats:
                    p = params[idx]
                    flats[idx] = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
                flats[idx][seg.start : seg.stop].add_(inc[off : off + seg.numel])
                off += seg.numel
        for idx, flat in flats.items():
            p = params[idx]
            if not p.is_contiguous():
                p.copy_(flat.view_as(p))

    def _gradient_rows(self, grads: Tensor | Sequence[Sequence[Tensor | None]], k: int) -> Tensor:
        """The ``(k, N)`` matrix of flattened measurement gradients in ``p_dtype``."""
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
            return grads.detach().to(device=device, dtype=self.p_dtype)
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
        return rows

    @torch.no_grad()
    def step_k(
        self,
        errors: Sequence[float] | Tensor,
        grads: Tensor | Sequence[Sequence[Tensor | None]],
    ) -> RLEKFRankKUpdate:
        r"""Apply ONE rank-``k`` update for ``k`` measurements taken at the current weights.

        This is the opt-in "fused" mode (:func:`~rlekf.optim.rlekf_update_rank_k`): one pass
        over ``P`` for all ``k`` measurements, with the shared ``k x k`` innovation matrix
        ``A = L*lambda*I_k + sum_i H_i^T P_i H_i``. ``.grad`` is neither read nor written.

        Differences from ``k`` calls of :meth:`step` (the paper's algorithm):

        * all ``k`` measurements are linearized at the same weights (no fresh forward pass
          between them); the update is the joint (batch) Kalman update for them, which for
          one block and ``lambda = 1`` equals ``k`` sequential updates of the linearized model;
          with several blocks the cross-block correlations that one measurement creates are
          seen by the others (the paper drops them after every measurement);
        * forgetting is applied once, with the product of the ``k`` factors the paper would
          use, ``lambda_eff = lambda_t * lambda_{t+1} * ... * lambda_{t+k-1}``: ``P`` is divided
          by ``lambda_eff`` once (the paper divides by each ``lambda_j`` in turn, so the total
          inflation of ``P`` is the same), and the measurement noise is ``L * lambda_eff``
          for all ``k`` (paper: ``L * lambda_j`` for measurement ``j``). Dividing by
          ``lambda_t`` alone would forget ~``k`` times less; measured on the short Cu
          training test it then did not learn forces at all within 720 measurements;
        * the schedule then advances by ``k`` measurements,
          ``lambda <- 1 - (1 - lambda) * nu**k``, i.e. ``lambda`` is the same function of
          :attr:`n_updates` as in the paper (``1 - lambda_t = (1 - lambda_1) nu^(t-1)``).

        Counters: an applied call adds ``k`` to :attr:`n_updates`; a skipped one (non-finite
        errors, gradients or ``A``, or ``A`` not positive definite) adds ``k`` to
        :attr:`n_skipped` and leaves ``P``, the weights and ``lambda`` untouched.
        :attr:`last_innovation` becomes ``tr(A) / k`` (``a`` itself for ``k = 1``). Periodic
        symmetrization runs when :attr:`n_updates` crosses a multiple of
        ``symmetrize_every``.

        Args:
            errors: The ``k`` errors ``eps_j`` (after the sign trick): a sequence of floats or
                a ``(k,)`` tensor.
            grads: Either a ``(k, N)`` tensor whose row ``j`` is ``H_j`` over all parameters,
                each flattened as ``p.reshape(-1)`` and concatenated in parameter order, or a
                sequence of ``k`` gradient sets, each one tensor (or ``None`` for zero) per
                parameter, as returned by ``torch.autograd.grad(..., allow_unused=True)``.

        Returns:
            The :class:`~rlekf.optim.RLEKFRankKUpdate` of the functional update.

        Raises:
            ValueError: On mismatched shapes or sparse gradients.
        """
        if isinstance(errors, Tensor):
            eps = errors.detach().reshape(-1)
        else:  # Python floats: float64, not the default dtype
            eps = torch.as_tensor([float(e) for e in errors], dtype=torch.float64)
        k = eps.numel()
        if k == 0:
            raise ValueError("RLEKF.step_k needs at least one error")
        rows = self._gradient_rows(grads, k)
        P = self._covariance()
        H = [rows[:, b.offset : b.offset + b.numel].mT for b in self._blocks]
        res = rlekf_update_rank_k(P, H, eps, self._lam_product(k))
        self._finish_k(res, P)
        return res

    def _lam_product(self, k: int) -> float:
        """``lambda_t * ... * lambda_{t+k-1}``: the factors ``k`` paper updates would use."""
        lam = float(self._anchor[_LAM])
        nu = self._group["nu"]
        return math.prod([lam] + [1.0 - (1.0 - lam) * nu**j for j in range(1, k)])

    def _finish_k(self, res: RLEKFRankKUpdate, P: Sequence[Tensor]) -> None:
        """Bookkeeping after a rank-k update: weights, counters, lambda, symmetrisation."""
        group = self._group
        anchor = self._anchor
        k = res.innovation.shape[0]
        anchor[_LAST_A] = float(res.innovation.diagonal().mean())
        if not res.applied:
            anchor[_N_SKIPPED] = int(anchor[_N_SKIPPED]) + k
            return
        self._scatter(res.increments)
        lam = float(anchor[_LAM])
        before = int(anchor[_N_UPDATES])
        anchor[_N_UPDATES] = n = before + k
        nu_k = group["nu"] ** k
        anchor[_LAM] = nu_k * lam + 1.0 - nu_k  # = 1 - (1 - lam) nu^k; k = 1: as in step
        every = group["symmetrize_every"]
        if every and n // every > before // every:
            for p_i in P:
                symmetrize_(p_i)

    # ------------------------------------------------------------------ logging
    @torch.no_grad()
    def kalman_stats(self) -> dict[str, Any]:
        """Scalars for logging.

        Returns:
            ``{"lambda", "n_updates", "n_skipped", "last_innovation", "block_sizes",
            "trace", "min_diag"}``; ``trace`` and ``min_diag`` are per-block lists of
            ``tr(P_i)`` and ``min(diag(P_i))``.
        """
        values = self._diag_stats()
        return {
            "lambda": self.lam,
            "n_updates": self.n_updates,
            "n_skipped": self.n_skipped,
            "last_innovation": self.last_innovation,
            "block_sizes": self.block_sizes,
            "trace": [v[0] for v in values],
            "min_diag": [v[1] for v in values],
        }

    def _diag_stats(self) -> list[list[float]]:
        """``[tr(P_i), min(diag(P_i))]`` of every block, in block order."""
        return torch.stack(
            [
                torch.stack([p.diagonal().sum(), p.diagonal().min()]).double()
                for p in self._covariance()
            ]
        ).tolist()

    # ------------------------------------------------------------------ checkpointing
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

        :meth:`torch.optim.Optimizer.load_state_dict` casts floating state to the dtype of
        the parameter it is stored under; the covariance blocks are taken out before that
        and restored afterwards in the (loaded) ``p_dtype`` on the parameters' device, so a
        save/load round trip is bit-exact. ``lambda`` and the counters are Python scalars.

        Raises:
            ValueError: If the state dict is not an RLEKF state dict or its block sizes do
                not match this optimizer's.
        """
        saved_state, anchor_id, saved_anchor = self._saved_anchor(state_dict)
        saved_p = saved_anchor.get(_P)
        if saved_p is not None:
            self._check_layout(
                saved_p,
                "Use the same parameters (in the same order) and block_size as the run that "
                "saved it.",
            )
        self._restore(dict(state_dict), saved_state, anchor_id, saved_anchor, saved_p)

    def _check_layout(self, saved_p: Sequence[Tensor], advice: str) -> None:
        """Raise ``ValueError`` unless ``saved_p`` are square blocks of :attr:`block_sizes`."""
        found = [
            tuple(t.shape) if t.dim() != 2 or t.shape[0] != t.shape[1] else t.shape[0]
            for t in saved_p
        ]
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
    ) -> None:
        """Load ``top`` with the anchor's ``P`` taken out, then set ``P`` to ``blocks``.

        The base class gets a shallow copy without ``P``, so it does not cast ``P`` to the
        parameters' dtype; ``blocks`` (this optimizer's, in order) are restored in the loaded
        ``p_dtype`` on the parameters' device. ``blocks=None`` leaves ``P`` unallocated.
        """
        stripped_anchor = {k: v for k, v in saved_anchor.items() if k != _P}
        top["state"] = {**saved_state, anchor_id: stripped_anchor}
        Optimizer.load_state_dict(self, top)

        group = self._group
        group["p_dtype"] = _resolve_p_dtype(group.get("p_dtype", "float64"))
        self._work = None
        if blocks is not None:
            device = group["params"][0].device
            self._anchor[_P] = [
                t.detach().to(device=device, dtype=self.p_dtype, copy=True) for t in blocks
            ]
