"""Pure RLEKF math on lists of covariance blocks.

One RLEKF update consumes one scalar pseudo-measurement with error ``eps`` and gradient
``H = d(prediction)/dw``, split into the same ``L`` blocks as the block-diagonal covariance
``P = diag(P_1, ..., P_L)``:

.. code-block:: text

    a    = L * lam + sum_i H_i^T P_i H_i        (ONE scalar shared by all blocks)
    K_i  = P_i H_i                              (computed once per block)
    w_i <- w_i + (eps / a) K_i
    P_i <- (P_i - K_i K_i^T / a) / lam          (in place, one fused addr_ per block)

The forgetting-factor schedule ``lam <- nu * lam + 1 - nu`` is the caller's job (once per
applied update). With ``L == 1`` this is the global EKF (GEKF) with ``R = 1``.

:func:`rlekf_update_rank_k` is the opt-in "fused" variant: ``k`` pseudo-measurements taken
at ONE linearization point are absorbed jointly, with a shared ``k x k`` innovation matrix
``A = L*lam*I_k + sum_i H_i^T P_i H_i`` (see its docstring for how it relates to ``k``
sequential rank-1 updates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "KalmanFactors",
    "RLEKFRankKUpdate",
    "RLEKFUpdate",
    "innovation",
    "kalman_factors",
    "negative_diagonal",
    "rlekf_update",
    "rank_k_apply_",
    "rank_k_factors",
    "rank_k_gain",
    "rlekf_update_rank_k",
    "rounding_floor",
    "symmetrize_",
]


class RLEKFUpdate(NamedTuple):
    """Result of :func:`rlekf_update`.

    Attributes:
        innovation: The shared innovation scalar ``a = L*lam + sum_i H_i^T P_i H_i``
            (``nan`` when the error was non-finite and ``a`` was not computed).
        applied: ``False`` when the update was skipped (non-finite error, ``H`` or ``a``, or
            ``a <= 0``); then neither ``P`` nor the weights were touched.
        increments: Weight increments ``dw_i = (eps / a) K_i``, shape ``(n_i,)`` in the dtype
            of ``P_i``, one per block; empty when skipped.
    """

    innovation: float
    applied: bool
    increments: tuple[Tensor, ...]


def _check_blocks(P: Sequence[Tensor], H: Sequence[Tensor]) -> None:
    if len(P) == 0:
        raise ValueError("rlekf_update needs at least one block")
    if len(P) != len(H):
        raise ValueError(f"got {len(P)} covariance blocks but {len(H)} gradient blocks")
    for i, (p, h) in enumerate(zip(P, H, strict=True)):
        n = h.shape[0] if h.dim() == 1 else -1
        if p.dim() != 2 or p.shape[0] != n or p.shape[1] != n:
            raise ValueError(
                f"block {i}: P has shape {tuple(p.shape)} but H has shape {tuple(h.shape)}; "
                "expected (n, n) and (n,)"
            )


def innovation(
    P: Sequence[Tensor],
    H: Sequence[Tensor],
    lam: float,
    *,
    out: Sequence[Tensor] | None = None,
) -> tuple[Tensor, list[Tensor]]:
    """Gains ``K_i = P_i H_i`` and the shared innovation scalar (as a 0-d tensor).

    Args:
        P: Covariance blocks, shapes ``(n_i, n_i)``.
        H: Gradient blocks, shapes ``(n_i,)``; cast to the dtype of ``P_i`` if needed.
        lam: Forgetting factor ``lambda_t``.
        out: Optional preallocated buffers for ``K_i`` (shape ``(n_i,)``, dtype of ``P_i``).

    Returns:
        ``(a, K)`` with ``a = L*lam + sum_i H_i^T K_i`` as a 0-d tensor on ``P``'s device and
        ``K`` the list of gains.
    """
    _check_blocks(P, H)
    gains: list[Tensor] = []
    quad: list[Tensor] = []
    for i, (p, h) in enumerate(zip(P, H, strict=True)):
        h = h.to(p.dtype)
        k = torch.mv(p, h) if out is None else torch.mv(p, h, out=out[i])
        gains.append(k)
        quad.append(torch.dot(h, k))
    a = torch.stack(quad).sum() + len(P) * lam
    return a, gains


def rlekf_update(
    weights: Sequence[Tensor] | None,
    P: Sequence[Tensor],
    H: Sequence[Tensor],
    error: float | Tensor,
    lam: float,
    *,
    out: Sequence[Tensor] | None = None,
) -> RLEKFUpdate:
    """Apply one RLEKF update in place (reference section 1.3).

    ``P`` is updated in one fused in-place pass per block,
    ``P_i.addr_(u_i, u_i, beta=1/lam, alpha=-1)`` with ``u_i = K_i / sqrt(a*lam)``; no
    ``n_i x n_i`` temporary is allocated. If the error, any ``H_i`` or ``a`` is non-finite,
    or ``a <= 0``, nothing is modified and ``applied`` is ``False``.

    Args:
        weights: Flat weight blocks, shapes ``(n_i,)``, updated in place with
            ``w_i += dw_i`` (cast to the weights' dtype by ``add_``), or ``None`` to only
            return the increments (e.g. when a block spans several parameter tensors).
        P: Covariance blocks, shapes ``(n_i, n_i)``, symmetric PSD; updated in place.
        H: Gradient blocks ``d(prediction)/dw_i``, shapes ``(n_i,)``; cast to ``P``'s dtype.
        error: Scalar error ``eps`` (label minus prediction, after the sign trick).
        lam: Forgetting factor ``lambda_t`` in ``(0, 1]``.
        out: Optional preallocated ``(n_i,)`` buffers in ``P``'s dtype; they hold ``K_i`` and
            on return the increments ``dw_i`` (avoids per-update allocations).

    Returns:
        The innovation scalar ``a``, whether the update was applied, and the increments.

    Raises:
        ValueError: On mismatched block shapes or a non-positive ``lam``.
    """
    if not lam > 0.0:
        raise ValueError(f"Invalid forgetting factor lam: {lam}")
    eps = float(error)
    if not math.isfinite(eps):
        _check_blocks(P, H)
        return RLEKFUpdate(math.nan, False, ())
    if weights is not None and len(weights) != len(P):
        raise ValueError(f"got {len(weights)} weight blocks but {len(P)} covariance blocks")

    a_t, gains = innovation(P, H, lam, out=out)
    h_ok = torch.stack([torch.isfinite(h).all() for h in H]).all()
    a, ok = torch.stack([a_t, h_ok.to(a_t.dtype)]).tolist()  # one host sync
    if not (ok and math.isfinite(a) and a > 0.0):
        return RLEKFUpdate(a, False, ())

    # P_i <- P_i / lam - u u^T with u = K_i / sqrt(a * lam). With alpha = -1 (exact) an
    # elementwise kernel computes entries (r, c) and (c, r) identically, so P stays bitwise
    # symmetric on devices whose kernel uses one code path for all entries (not verified
    # on CUDA here). alpha =
    # -1/(a*lam) would round alpha*K_r*K_c differently for the two. CPU kernels can still
    # differ between vectorized body and scalar tail: see symmetrize_.
    beta = 1.0 / lam
    root = math.sqrt(a * lam)
    scale = eps * root / a  # dw_i = (eps / a) K_i = scale * u_i
    for i, (p, k) in enumerate(zip(P, gains, strict=True)):
        k.div_(root)
        p.addr_(k, k, beta=beta, alpha=-1.0)
        k.mul_(scale)
        if weights is not None:
            weights[i].add_(k)
    return RLEKFUpdate(a, True, tuple(gains))


class RLEKFRankKUpdate(NamedTuple):
    """Result of :func:`rlekf_update_rank_k`.

    Attributes:
        innovation: The shared ``k x k`` innovation matrix
            ``A = L*lam*I_k + sum_i H_i^T P_i H_i`` (float64, on the CPU, symmetrized); all
            ``nan`` when the errors were non-finite and ``A`` was not computed.
        applied: ``False`` when the update was skipped (non-finite errors, ``H`` or ``A``, or
            ``A`` not positive definite); then neither ``P`` nor the weights were touched.
        increments: Weight increments ``dw_i = K_i A^{-1} eps``, shape ``(n_i,)`` in the dtype
            of ``P_i``, one per block; empty when skipped.
    """

    innovation: Tensor
    applied: bool
    increments: tuple[Tensor, ...]


def _check_blocks_k(P: Sequence[Tensor], H: Sequence[Tensor], k: int) -> None:
    if len(P) == 0:
        raise ValueError("rlekf_update_rank_k needs at least one block")
    if len(P) != len(H):
        raise ValueError(f"got {len(P)} covariance blocks but {len(H)} gradient blocks")
    for i, (p, h) in enumerate(zip(P, H, strict=True)):
        n = p.shape[0] if p.dim() == 2 else -1
        if p.dim() != 2 or p.shape[1] != n or h.dim() != 2 or tuple(h.shape) != (n, k):
            raise ValueError(
                f"block {i}: P has shape {tuple(p.shape)} but H has shape {tuple(h.shape)}; "
                f"expected (n, n) and (n, k) with k = {k} (the number of errors)"
            )


def rlekf_update_rank_k(
    P: Sequence[Tensor],
    H: Sequence[Tensor],
    errors: Sequence[float] | Tensor,
    lam: float,
    *,
    weights: Sequence[Tensor] | None = None,
    out: Sequence[Tensor] | None = None,
) -> RLEKFRankKUpdate:
    """Absorb ``k`` pseudo-measurements at one linearization point in one pass over ``P``.

    With ``H_i`` the ``(n_i, k)`` gradient columns of block ``i`` and ``eps`` the ``k``
    errors:

    .. code-block:: text

        K_i  = P_i H_i                                  (n_i x k, one read of P_i)
        A    = L*lam*I_k + sum_i H_i^T K_i              (k x k, ONE matrix shared by blocks)
        A    = C C^T                                    (Cholesky, float64)
        U_i  = K_i C^{-T} / sqrt(lam)
        w_i <- w_i + K_i A^{-1} eps   = sqrt(lam) U_i (C^{-1} eps)
        P_i <- (P_i - K_i A^{-1} K_i^T) / lam
             = P_i.addmm_(U_i, U_i^T, beta=1/lam, alpha=-1)    (in place, no n_i x n_i temp)

    It is the ``k``-measurement generalisation of :func:`rlekf_update` (measurement noise
    ``R = L*lam*I_k``); with ``k = 1`` it reproduces it to rounding.

    Semantics (differences from ``k`` calls of :func:`rlekf_update`):

    * ``lam`` is applied once for all ``k`` measurements (``P`` is divided by ``lam`` once and
      ``L*lam`` enters every diagonal entry of ``A``); the paper divides by ``lam_t`` at every
      measurement. Choosing ``lam`` and advancing the schedule is the caller's job:
      :meth:`~rlekf.optim.RLEKF.step_k` passes the product ``lam_t * ... * lam_{t+k-1}`` (the
      same total forgetting as ``k`` paper updates) and then sets
      ``lam <- 1 - (1 - lam) * nu**k``.
    * With ``lam = 1`` and one block (``L = 1``, GEKF) the result equals ``k`` sequential
      rank-1 updates with the same ``H``'s when each later error is taken at the updated
      weights of the linearized model (``eps_j - H_j^T dw_so_far``), as a fresh forward pass
      would give to first order; this is the usual batch/sequential Kalman identity and holds
      exactly in exact arithmetic. With ``L > 1`` blocks it equals the diagonal blocks of
      those ``k`` sequential updates done on the FULL matrix ``blockdiag(P_i)`` (``R = L``);
      sequential block-diagonal updates instead drop the off-diagonal blocks ``K_i K_j^T / a``
      after every measurement, so they differ from it at second order (the cross-block
      correlation created by one measurement is seen by the next one here, not there).

    Args:
        P: Covariance blocks, shapes ``(n_i, n_i)``, symmetric PSD; updated in place.
        H: Gradient blocks, shapes ``(n_i, k)`` (column ``j`` is ``d(prediction_j)/dw_i``);
            cast to ``P``'s dtype. Views (e.g. a transposed slice of a ``(k, N)`` matrix)
            are fine.
        errors: The ``k`` errors ``eps_j`` (after the sign trick), a sequence or ``(k,)``
            tensor.
        lam: Forgetting factor in ``(0, 1]``, applied once for all ``k`` measurements.
        weights: Optional flat weight blocks ``(n_i,)`` to update in place with ``w_i += dw_i``.
        out: Optional preallocated ``(n_i, k)`` buffers in ``P``'s dtype for ``K_i``.

    Returns:
        The innovation matrix ``A``, whether the update was applied, and the increments.
        Non-finite errors, ``H`` or ``A``, or an ``A`` that is not positive definite (the
        Cholesky factorization fails) skip the update; nothing is modified.

    Raises:
        ValueError: On mismatched shapes or a non-positive ``lam``.
    """
    if not lam > 0.0:
        raise ValueError(f"Invalid forgetting factor lam: {lam}")
    if isinstance(errors, Tensor):
        eps = errors.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    else:  # Python floats: float64, not the default dtype
        eps = torch.as_tensor([float(e) for e in errors], dtype=torch.float64)
    k = eps.numel()
    if k == 0:
        raise ValueError("rlekf_update_rank_k needs at least one error")
    _check_blocks_k(P, H, k)
    if weights is not None and len(weights) != len(P):
        raise ValueError(f"got {len(weights)} weight blocks but {len(P)} covariance blocks")
    nan = torch.full((k, k), math.nan, dtype=torch.float64)
    if not bool(torch.isfinite(eps).all()):
        return RLEKFRankKUpdate(nan, False, ())

    gains: list[Tensor] = []
    quad: Tensor | None = None
    h_ok: list[Tensor] = []
    for i, (p, h) in enumerate(zip(P, H, strict=True)):
        g, q, ok = rank_k_gain(p, h, None if out is None else out[i])
        gains.append(g)
        quad = q if quad is None else quad.add_(q)
        h_ok.append(ok)
    assert quad is not None
    ok_dev = torch.stack(h_ok).all().to(quad.dtype).reshape(1, 1).expand(1, k)
    # one host transfer (and sync) for A and the finiteness flag; the k x k algebra is float64
    host = torch.cat([quad, ok_dev]).to(device="cpu", dtype=torch.float64)
    A, factors = rank_k_factors(host[:k], bool(host[k, 0]), eps, lam, len(P))
    if factors is None:
        return RLEKFRankKUpdate(A, False, ())
    increments: list[Tensor] = []
    for i, (p, g) in enumerate(zip(P, gains, strict=True)):
        inc = rank_k_apply_(p, g, factors, lam)
        if weights is not None:
            weights[i].add_(inc)
        increments.append(inc)
    return RLEKFRankKUpdate(A, True, tuple(increments))


def rank_k_gain(p: Tensor, h: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One block's share of a rank-``k`` update: ``K_i = P_i H_i`` and ``H_i^T K_i``.

    Args:
        p: ``P_i``, shape ``(n_i, n_i)``.
        h: ``H_i``, shape ``(n_i, k)`` (cast to ``p``'s dtype).
        out: Optional ``(n_i, k)`` buffer for ``K_i``.

    Returns:
        ``(K_i, H_i^T K_i, all(isfinite(H_i)))``, the last a 0-d bool tensor on ``p``'s
        device (no host sync here).
    """
    h = h.to(p.dtype)
    g = torch.mm(p, h) if out is None else torch.mm(p, h, out=out)
    return g, h.mT @ g, torch.isfinite(h).all()


def rank_k_factors(
    quad: Tensor, h_finite: bool, eps: Tensor, lam: float, n_blocks: int
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The ``k x k`` algebra of a rank-``k`` update, on the host in float64.

    Args:
        quad: ``sum_i H_i^T P_i H_i``, shape ``(k, k)``, float64 on the CPU.
        h_finite: Whether every ``H_i`` was finite.
        eps: The ``k`` errors, float64 on the CPU.
        lam: Forgetting factor applied once for the ``k`` measurements.
        n_blocks: ``L``, the number of blocks (measurement noise ``L*lam``).

    Returns:
        ``(A, factors)`` with the symmetrised innovation matrix
        ``A = (quad + quad^T)/2 + L*lam*I_k`` and ``factors = (M, v)``,
        ``M = C^{-T}/sqrt(lam)``, ``v = sqrt(lam) C^{-1} eps`` (``A = C C^T``), or
        ``factors = None`` when the update must be skipped (non-finite ``H`` or ``A``, or
        ``A`` not positive definite).
    """
    k = eps.numel()
    A = 0.5 * (quad + quad.mT) + n_blocks * lam * torch.eye(k, dtype=torch.float64)
    if not (h_finite and bool(torch.isfinite(A).all())):
        return A, None
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return A, None
    eye = torch.eye(k, dtype=torch.float64)
    # M = C^{-T} / sqrt(lam) so that U = K M, U U^T = K A^{-1} K^T / lam
    m = torch.linalg.solve_triangular(chol, eye, upper=False).mT / math.sqrt(lam)
    v = torch.linalg.solve_triangular(chol, eps.reshape(k, 1), upper=False) * math.sqrt(lam)
    return A, (m, v)


def rank_k_apply_(p: Tensor, gain: Tensor, factors: tuple[Tensor, Tensor], lam: float) -> Tensor:
    """Update one block in place, ``P_i <- (P_i - K_i A^{-1} K_i^T) / lam``; return ``dw_i``.

    Args:
        p: ``P_i``, shape ``(n_i, n_i)``, updated in place.
        gain: ``K_i = P_i H_i``, shape ``(n_i, k)``.
        factors: ``(M, v)`` from :func:`rank_k_factors`.
        lam: The same forgetting factor.

    Returns:
        The weight increment ``dw_i = K_i A^{-1} eps``, shape ``(n_i,)`` in ``P_i``'s dtype.
    """
    m, v = factors
    u = gain @ m.to(device=gain.device, dtype=gain.dtype)
    # alpha = -1 (exact) so that entries (r, c) and (c, r) round alike where the kernel
    # uses one code path for them (cf. rlekf_update)
    p.addmm_(u, u.mT, beta=1.0 / lam, alpha=-1.0)
    return (u @ v.to(device=u.device, dtype=u.dtype)).reshape(-1)


@torch.no_grad()
def symmetrize_(P: Tensor, tile: int = 512) -> Tensor:
    """Replace ``P`` by ``(P + P^T) / 2`` in place, tile by tile.

    Why it is needed at all: the exact update keeps ``P`` symmetric, but a fused CPU
    ``addr_`` kernel rounds element ``(r, c)`` and ``(c, r)`` in different code paths
    (vectorized body vs. scalar tail). The antisymmetric part this creates is never damped
    by the measurements (``K K^T`` is symmetric); it is only multiplied by ``1/lam`` at every
    update (up to ``prod 1/lam ~ 5e6`` over the default schedule), while the symmetric part
    shrinks as data arrive. Measured on random data (CPU, 3000 updates): relative asymmetry
    ``~2e-3`` in float64, and in float32 ``P`` turns indefinite (most updates then skip).
    Symmetrizing every ~100 updates removes it at ~1-2 % of the update cost.

    Args:
        P: Square matrix ``(n, n)``.
        tile: Tile edge; the only temporaries are ``tile x tile``.

    Returns:
        ``P`` (modified in place).
    """
    if P.dim() != 2 or P.shape[0] != P.shape[1]:
        raise ValueError(f"symmetrize_ needs a square matrix, got shape {tuple(P.shape)}")
    if tile <= 0:
        raise ValueError(f"Invalid tile: {tile}")
    n = P.shape[0]
    for i in range(0, n, tile):
        for j in range(i, n, tile):
            upper = P[i : i + tile, j : j + tile]
            lower = P[j : j + tile, i : i + tile]
            avg = (upper + lower.mT).mul_(0.5)
            upper.copy_(avg)
            lower.copy_(avg.mT)
    return P


def rounding_floor(max_diag: float, n: int, dtype: torch.dtype) -> float:
    """The smallest diagonal shift that repairs a block which lost definiteness.

    Rounding the entries of an ``n x n`` symmetric positive semi-definite matrix to ``dtype``
    perturbs its eigenvalues by up to about ``sqrt(n) * eps * max_j S_jj`` (a random-sign error
    of ``eps * |S_jk| <= eps * max_j S_jj`` per entry); a negative eigenvalue of that size is
    rounding, and a repair must shift by at least this much to remove it.

    Args:
        max_diag: ``max_j S_jj`` (in the units of the stored matrix).
        n: Order of the block.
        dtype: Storage dtype (float32 or float64).

    Returns:
        ``sqrt(n) * finfo(dtype).eps * max_diag`` (0 for a non-positive ``max_diag``).
    """
    return math.sqrt(n) * torch.finfo(dtype).eps * max(float(max_diag), 0.0)


def negative_diagonal(diag: Tensor, V: Tensor, dtype: torch.dtype) -> Tensor:
    """Which blocks a downdate ``S <- S - V V^T`` would give a negative diagonal entry.

    With ``S`` positive semi-definite, ``diag(S - V V^T) >= 0`` for a Kalman correction; an
    entry below minus the rounding level (:func:`rounding_floor`) means ``S`` has lost
    definiteness in a direction that ``H^T P H`` did not show, and the downdate would amplify
    it.

    Args:
        diag: ``(B, n)`` ``diag(S)`` of ``B`` blocks (any float dtype).
        V: ``(B, k, n)`` the correction's factors (``S - V^T V`` in this layout).
        dtype: Storage dtype of ``S`` (sets the rounding level).

    Returns:
        ``(B,)`` bool.
    """
    d = diag.to(torch.float64)
    after = d - V.to(torch.float64).square().sum(1)
    # rounding_floor is linear in max diag: its value at 1 scales every block's
    tol = rounding_floor(1.0, d.shape[1], dtype) * d.amax(1, keepdim=True).clamp_min(0.0)
    return (after < -tol).any(1)


class KalmanFactors(NamedTuple):
    """The host-side result of one (rank-``k``) update on stored ``P_i = c_i (S_i - V_i V_i^T)``.

    Attributes:
        innovation: ``A = L*lam*I_k + sum_i c_i H_i^T S_i H_i`` (``(k, k)``, float64, CPU,
            symmetrised); for ``k = 1`` the innovation scalar ``a``.
        applied: Whether the update is applied (finite errors, ``H`` and ``A``, ``A``
            positive definite, and no block lost definiteness).
        weight: ``A^{-1} eps`` (``(k,)``, float64): block ``i``'s weight increment is
            ``c_i U_i @ weight`` with ``U_i = S_i H_i``.
        pending: ``C^{-T}`` with ``A = C C^T`` (``(k, k)``, float64): block ``i``'s pending
            correction is ``V_i = sqrt(c_i) U_i @ pending``, after which ``c_i <- c_i / lam``.
        indefinite: Blocks whose ``h^T P_i h`` was negative for some measurement column:
            ``P_i`` lost definiteness in that direction (the update is then skipped and the
            caller repairs those blocks).
        repair: For each block of ``indefinite``, a shift ``delta`` (in units of ``P``) that
            makes the offending Rayleigh quotient of ``P_i + delta*I`` positive (twice its
            magnitude).
    """

    innovation: Tensor
    applied: bool
    weight: Tensor | None
    pending: Tensor | None
    indefinite: tuple[int, ...]
    repair: tuple[float, ...]


def kalman_factors(
    quads: Tensor,
    h_norms: Tensor,
    eps: Tensor,
    lam: float,
    h_finite: bool,
) -> KalmanFactors:
    """The ``k x k`` algebra of an RLEKF update from per-block quadratic forms (float64, host).

    With ``Q_i = H_i^T P_i H_i = c_i H_i^T S_i H_i`` (after the pending correction):

    .. code-block:: text

        A    = L*lam*I_k + sum_i Q_i                  (one matrix shared by all L blocks)
        dw_i = K_i A^{-1} eps = c_i U_i (A^{-1} eps)  (U_i = S_i H_i)
        P_i <- (P_i - K_i A^{-1} K_i^T) / lam
             = (c_i / lam) (S_i - V_i V_i^T),  V_i = sqrt(c_i) U_i C^{-T},  A = C C^T

    For ``k = 1`` this is the paper's rank-1 update (``a = L*lam + sum_i H_i^T P_i H_i``,
    ``dw_i = (eps/a) K_i``, ``P_i <- (P_i - K_i K_i^T/a)/lam``).

    Args:
        quads: ``(L, k, k)`` float64 CPU: ``Q_i`` of every block, in block order (the sum runs
            in that order, so sharded and single-process results agree bitwise).
        h_norms: ``(L, k)`` float64 CPU: ``|H_i[:, j]|^2`` (used only to size a repair).
        eps: The ``k`` errors, float64 CPU.
        lam: Forgetting factor for this update (``L*lam`` is the measurement noise).
        h_finite: Whether every ``H_i`` was finite.

    Returns:
        The :class:`KalmanFactors`.
    """
    n_blocks, k, _ = quads.shape
    quad = quads[0].clone()
    for i in range(1, n_blocks):  # block order
        quad.add_(quads[i])
    A = 0.5 * (quad + quad.mT) + n_blocks * lam * torch.eye(k, dtype=torch.float64)
    if not (h_finite and bool(torch.isfinite(eps).all()) and bool(torch.isfinite(A).all())):
        return KalmanFactors(A, False, None, None, (), ())
    diag = quads.diagonal(dim1=1, dim2=2)  # (L, k): h_j^T P_i h_j, >= 0 for P_i PSD
    bad = (diag < 0).any(dim=1).nonzero().flatten().tolist()
    if bad:
        tiny = torch.finfo(torch.float64).tiny
        repair = tuple(2.0 * float((-diag[i] / h_norms[i].clamp_min(tiny)).max()) for i in bad)
        return KalmanFactors(A, False, None, None, tuple(bad), repair)
    chol, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return KalmanFactors(A, False, None, None, (), ())
    eye = torch.eye(k, dtype=torch.float64)
    pending = torch.linalg.solve_triangular(chol, eye, upper=False).mT  # C^{-T}
    weight = torch.cholesky_solve(eps.reshape(k, 1), chol).reshape(k)
    return KalmanFactors(A, True, weight, pending, (), ())
