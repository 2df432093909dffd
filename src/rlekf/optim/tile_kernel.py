"""One fused CPU kernel for a whole sweep over a :class:`~rlekf.optim.tiled.TileGroup`.

The torch path of :meth:`TileGroup.sweep_rows_` issues three library calls per tile
(correction, ``S H``, ``S^T H``); with ~1,000 tiles per update of a Cu model each call's
dispatch and OpenMP fork/join costs more than its bytes (README, Kalman update speed). This
module does the same arithmetic in one compiled loop nest (Numba, ``parallel=True``): every
stored element is read once and, when a correction is pending, written once; the correction,
both products and the optional re-symmetrisation of diagonal tiles happen while a tile row
is in L1.

Arithmetic (per stored element ``s`` of tile row ``r``, column ``c``, block ``b``):

* correction: ``s <- round(s - sum_j V[b, j, r] * V[b, j, c])`` with the sum in float64 and
  one rounding to the storage dtype;
* products, in float64: ``Y[b, j, r] += s * H[b, j, c]`` and, off the diagonal tiles,
  ``Y[b, j, c] += s * H[b, j, r]``.

Parallel and deterministic: the (block, tile) work items are cut into :data:`N_CHUNKS`
contiguous chunks of about equal element counts, independent of the thread count; each chunk
accumulates into its own ``Y`` and the chunks are summed in order, so the bits depend neither
on the number of threads nor on their scheduling. A flush (:func:`apply`) runs the same
compiled function with no products, so a correction gives the same bits whether it is
flushed or applied by the next sweep.

Numba is imported lazily: :func:`available` says whether it is installed; without it
:class:`~rlekf.optim.tiled.TileGroup` keeps the torch path.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from torch import Tensor

__all__ = ["N_CHUNKS", "apply", "available", "chunk_bounds", "layout_arrays", "sweep"]

# work chunks per sweep (each with a private Y): >= the threads a CPU host would use, few
# enough that the private accumulators stay small (N_CHUNKS * B * k * n float64)
N_CHUNKS = 8


def _limit_pool() -> None:
    """Size Numba's thread pool to torch's thread count before Numba is first imported
    (``NUMBA_NUM_THREADS``, unless set): Numba's default, one thread per core, spins while
    idle and slowed two 1-thread runs sharing 2 cores (a parallel sweep) 2.7x (README)."""
    os.environ.setdefault("NUMBA_NUM_THREADS", str(max(1, torch.get_num_threads())))


@functools.cache
def available() -> bool:
    """Whether Numba can be imported (the fused kernel can run)."""
    _limit_pool()
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def layout_arrays(layout: list[tuple[int, ...]]) -> np.ndarray:
    """``(n_tiles, 6)`` int64 ``(r0, r1, c0, c1, offset, is_diagonal)`` of a tile layout
    (:func:`rlekf.optim.tiled._layout` rows ``(r, c, r0, r1, c0, c1, offset)``)."""
    out = np.empty((len(layout), 6), dtype=np.int64)
    for i, (r, c, r0, r1, c0, c1, off) in enumerate(layout):
        out[i] = (r0, r1, c0, c1, off, int(r == c))
    return out


def chunk_bounds(lay: np.ndarray, count: int, n_chunks: int = N_CHUNKS) -> np.ndarray:
    """Work-item bounds ``(n_chunks + 1,)`` int64: chunk ``q`` does items
    ``[bounds[q], bounds[q+1])``, item ``w`` is tile ``w % n_tiles`` of block
    ``w // n_tiles``; cut so that the chunks hold about equal numbers of elements."""
    sizes = (lay[:, 1] - lay[:, 0]) * (lay[:, 3] - lay[:, 2])
    cum = np.cumsum(np.tile(sizes, count))
    total = int(cum[-1])
    targets = [total * q // n_chunks for q in range(1, n_chunks)]
    inner = np.searchsorted(cum, targets, side="right")
    return np.concatenate(([0], inner, [len(cum)])).astype(np.int64)


def _kernel():
    _limit_pool()
    from rlekf.optim._tile_numba import sweep_kernel

    return sweep_kernel


def _set_threads() -> None:
    """Run on as many threads as torch does (``torch.set_num_threads``/``OMP_NUM_THREADS``),
    at most Numba's pool."""
    import numba

    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


def _np(t: Tensor) -> np.ndarray:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError("the fused tile kernel needs contiguous CPU tensors")
    return t.numpy()


def sweep(
    buffer: Tensor,
    lay: np.ndarray,
    bounds: np.ndarray,
    H: Tensor,
    V: Tensor | None,
    symmetrize: bool = False,
) -> Tensor:
    """One pass over a group's stored tiles: ``S <- S - V V^T`` (if ``V``), optionally
    ``t <- (t + t^T)/2`` for the diagonal tiles, and ``Y = S H``.

    Args:
        buffer: ``(B, m)`` packed lower tiles (float64 or float32, contiguous, CPU); updated
            in place.
        lay: :func:`layout_arrays` of the group's layout.
        bounds: :func:`chunk_bounds` for ``B`` blocks.
        H: ``(B, k, n)`` float64 contiguous.
        V: ``(B, k', n)`` pending factors in the storage dtype, or ``None``.
        symmetrize: Re-symmetrise the diagonal tiles after the correction.

    Returns:
        ``Y = S H`` as ``(B, k, n)`` float64 (a new tensor).
    """
    B, k, n = H.shape
    n_chunks = bounds.shape[0] - 1
    Yc = torch.zeros(n_chunks, B, k, n, dtype=torch.float64)
    if V is None:
        V = torch.zeros(B, 0, n, dtype=buffer.dtype)
    _set_threads()
    _kernel()(_np(buffer), lay, bounds, _np(H), _np(V), Yc.numpy(), bool(symmetrize))
    return Yc.sum(0)


def apply(buffer: Tensor, lay: np.ndarray, bounds: np.ndarray, V: Tensor) -> None:
    """``S <- S - V V^T`` in place: :func:`sweep` with no products (the same compiled code)."""
    B, _, n = V.shape
    sweep(buffer, lay, bounds, torch.zeros(B, 0, n, dtype=torch.float64), V)
