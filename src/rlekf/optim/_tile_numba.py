"""Numba kernels of :mod:`rlekf.optim.tile_kernel` (imported only when Numba is installed).

Inner loops run over 1-D C-contiguous row segments (``x[b, j][c0:c1]``: Numba types a slice
of a 3-D array as non-contiguous, which blocks vectorisation) with indices from ``range``.

Floating-point flags: reassociation (``reassoc``, so that the dot products vectorise) and
contraction into fused multiply-adds (``contract``), but no finite-math assumptions (NaNs
propagate as in IEEE arithmetic). Reassociation makes the bits of a loop depend on how it
is compiled, so each quantity has one loop: the correction (:func:`_correct`) and the
products (:func:`_products1`) are separate loops over the row segment (in L1), whether a
correction is pending or not, whether the sweep is a flush or not; a flush followed by a
sweep and a sweep with the correction pending then give the same bits (tested).
"""

import numba
import numpy as np

_FLAGS = {"reassoc", "nsz", "arcp", "contract"}


@numba.njit(fastmath=_FLAGS, cache=True, inline="always")
def _products1(seg, h, y, hr, diag):  # pragma: no cover - compiled
    """Returns ``seg . h``; off the diagonal also ``y += seg * hr``."""
    acc = 0.0
    if diag:
        for cc in range(seg.shape[0]):
            acc += np.float64(seg[cc]) * h[cc]
    else:
        for cc in range(seg.shape[0]):
            s = np.float64(seg[cc])
            acc += s * h[cc]
            y[cc] += s * hr
    return acc


@numba.njit(fastmath=_FLAGS, cache=True, inline="always")
def _correct(seg, V, b, r, c0, c1, tmp):  # pragma: no cover - compiled
    """``seg <- round(seg - sum_j V[b, j, r] * V[b, j, c0:c1])``, the sum in float64."""
    cols = c1 - c0
    if V.shape[1] == 1:
        a = np.float64(V[b, 0, r])
        v = V[b, 0][c0:c1]
        for cc in range(cols):
            seg[cc] = np.float64(seg[cc]) - a * np.float64(v[cc])
        return
    for cc in range(cols):
        tmp[cc] = 0.0
    for j in range(V.shape[1]):
        a = np.float64(V[b, j, r])
        vj = V[b, j][c0:c1]
        for cc in range(cols):
            tmp[cc] += a * np.float64(vj[cc])
    for cc in range(cols):
        seg[cc] = np.float64(seg[cc]) - tmp[cc]


@numba.njit(fastmath=_FLAGS, cache=True, inline="always")
def _row(seg, b, r, c0, c1, diag, H, V, Y, tmp, correct, multiply):  # pragma: no cover
    """Tile row ``r`` (columns ``c0:c1``) of block ``b``: correction, then products (two
    loops over the segment, see the module docstring)."""
    k = H.shape[1]
    if correct:
        _correct(seg, V, b, r, c0, c1, tmp)
    if multiply:
        for j in range(k):
            Y[b, j, r] += _products1(seg, H[b, j][c0:c1], Y[b, j][c0:c1], H[b, j, r], diag)


@numba.njit(parallel=True, fastmath=_FLAGS, cache=True, nogil=True)
def sweep_kernel(buf, lay, bounds, H, V, Yc, symmetrize):  # pragma: no cover - compiled
    """See :func:`rlekf.optim.tile_kernel.sweep` (``Yc``: ``(n_chunks, B, k, n)`` zeros)."""
    n_tiles = lay.shape[0]
    correct = V.shape[1] > 0
    multiply = H.shape[1] > 0
    width = 1
    for i in range(n_tiles):
        width = max(width, lay[i, 3] - lay[i, 2])
    for q in numba.prange(bounds.shape[0] - 1):
        Y = Yc[q]
        tmp = np.empty(width, dtype=np.float64)
        for w in range(bounds[q], bounds[q + 1]):
            b = w // n_tiles
            i = w - b * n_tiles
            r0 = lay[i, 0]
            c0 = lay[i, 2]
            c1 = lay[i, 3]
            off = lay[i, 4]
            diag = lay[i, 5] == 1
            rows = lay[i, 1] - r0
            cols = c1 - c0
            t = buf[b, off : off + rows * cols].reshape(rows, cols)
            if symmetrize and diag:  # correct the whole tile, symmetrise, then multiply
                for rr in range(rows):
                    _row(t[rr], b, r0 + rr, c0, c1, diag, H, V, Y, tmp, correct, False)
                for rr in range(rows):
                    for cc in range(rr + 1, cols):
                        m = (t[rr, cc] + t[cc, rr]) * 0.5
                        t[rr, cc] = m
                        t[cc, rr] = m
                for rr in range(rows):
                    _row(t[rr], b, r0 + rr, c0, c1, diag, H, V, Y, tmp, False, multiply)
            else:
                for rr in range(rows):
                    _row(t[rr], b, r0 + rr, c0, c1, diag, H, V, Y, tmp, correct, multiply)
