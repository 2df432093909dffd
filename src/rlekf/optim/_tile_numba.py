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
def _products4(s0, s1, s2, s3, h, y, hr0, hr1, hr2, hr3, diag):  # pragma: no cover
    """Four rows at once (register blocking): returns ``(s_q . h)`` for ``q = 0..3``; off the
    diagonal also ``y += sum_q s_q * hr_q``. Each element of ``h`` and ``y`` is loaded once for
    four rows instead of once per row."""
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    if diag:
        for cc in range(h.shape[0]):
            hc = h[cc]
            a0 += np.float64(s0[cc]) * hc
            a1 += np.float64(s1[cc]) * hc
            a2 += np.float64(s2[cc]) * hc
            a3 += np.float64(s3[cc]) * hc
    else:
        for cc in range(h.shape[0]):
            hc = h[cc]
            x0 = np.float64(s0[cc])
            x1 = np.float64(s1[cc])
            x2 = np.float64(s2[cc])
            x3 = np.float64(s3[cc])
            a0 += x0 * hc
            a1 += x1 * hc
            a2 += x2 * hc
            a3 += x3 * hc
            y[cc] += x0 * hr0 + x1 * hr1 + x2 * hr2 + x3 * hr3
    return a0, a1, a2, a3


@numba.njit(fastmath=_FLAGS, cache=True, inline="always")
def _correct4(s0, s1, s2, s3, V, b, r, c0, c1, tmp):  # pragma: no cover - compiled
    """Rows ``r..r+3``: ``s_q <- round(s_q - sum_j V[b, j, r+q] * V[b, j, c0:c1])`` (the sum
    in float64, ``tmp``: ``(4, width)`` float64 scratch), each ``V`` row loaded once."""
    cols = c1 - c0
    t0 = tmp[0]
    t1 = tmp[1]
    t2 = tmp[2]
    t3 = tmp[3]
    for cc in range(cols):
        t0[cc] = 0.0
        t1[cc] = 0.0
        t2[cc] = 0.0
        t3[cc] = 0.0
    for j in range(V.shape[1]):
        v0 = np.float64(V[b, j, r])
        v1 = np.float64(V[b, j, r + 1])
        v2 = np.float64(V[b, j, r + 2])
        v3 = np.float64(V[b, j, r + 3])
        vj = V[b, j][c0:c1]
        for cc in range(cols):
            v = np.float64(vj[cc])
            t0[cc] += v0 * v
            t1[cc] += v1 * v
            t2[cc] += v2 * v
            t3[cc] += v3 * v
    for cc in range(cols):
        s0[cc] = np.float64(s0[cc]) - t0[cc]
        s1[cc] = np.float64(s1[cc]) - t1[cc]
        s2[cc] = np.float64(s2[cc]) - t2[cc]
        s3[cc] = np.float64(s3[cc]) - t3[cc]


@numba.njit(fastmath=_FLAGS, cache=True, inline="always")
def _row(seg, b, r, c0, c1, diag, H, V, Y, tmp, correct, multiply):  # pragma: no cover
    """Tile row ``r`` (columns ``c0:c1``) of block ``b``: correction, then products (two
    loops over the segment, see the module docstring)."""
    k = H.shape[1]
    if correct:
        _correct(seg, V, b, r, c0, c1, tmp[0])
    if multiply:
        for j in range(k):
            Y[b, j, r] += _products1(seg, H[b, j][c0:c1], Y[b, j][c0:c1], H[b, j, r], diag)


@numba.njit(fastmath=_FLAGS, cache=True, inline="always")
def _rows(t, rr, b, r0, c0, c1, diag, H, V, Y, tmp, correct, multiply):  # pragma: no cover
    """Tile rows ``rr..rr+3`` (local; global ``r0 + rr``) of block ``b``: with a rank >= 2
    correction it runs four rows at once (:func:`_correct4`), and so do the products for
    ``k >= 2`` columns (:func:`_products4`); rank 1 keeps the one-row loops. The choice
    depends only on ``V``'s and ``H``'s widths, so a flush and a sweep correct alike."""
    r = r0 + rr
    s0 = t[rr]
    s1 = t[rr + 1]
    s2 = t[rr + 2]
    s3 = t[rr + 3]
    if correct:
        if V.shape[1] >= 2:
            _correct4(s0, s1, s2, s3, V, b, r, c0, c1, tmp)
        else:
            for q in range(4):
                _correct(t[rr + q], V, b, r + q, c0, c1, tmp[0])
    if multiply:
        if H.shape[1] >= 2:
            for j in range(H.shape[1]):
                hj = H[b, j]
                a0, a1, a2, a3 = _products4(
                    s0,
                    s1,
                    s2,
                    s3,
                    hj[c0:c1],
                    Y[b, j][c0:c1],
                    hj[r],
                    hj[r + 1],
                    hj[r + 2],
                    hj[r + 3],
                    diag,
                )
                Y[b, j, r] += a0
                Y[b, j, r + 1] += a1
                Y[b, j, r + 2] += a2
                Y[b, j, r + 3] += a3
        else:
            for q in range(4):
                _row(t[rr + q], b, r + q, c0, c1, diag, H, V, Y, tmp, False, True)


@numba.njit(fastmath=_FLAGS, cache=True, inline="always")
def _tile(t, rows, b, r0, c0, c1, diag, H, V, Y, tmp, correct, multiply):  # pragma: no cover
    """All rows of one tile: rank 1 (``H`` and ``V`` at most one column) row by row; else
    blocks of four rows, then the remaining rows one by one (a rank-1 correction uses
    :func:`_correct` on either path, so its bits do not depend on the path)."""
    if H.shape[1] <= 1 and V.shape[1] <= 1:
        for rr in range(rows):
            _row(t[rr], b, r0 + rr, c0, c1, diag, H, V, Y, tmp, correct, multiply)
        return
    rr = 0
    while rr + 4 <= rows:
        _rows(t, rr, b, r0, c0, c1, diag, H, V, Y, tmp, correct, multiply)
        rr += 4
    while rr < rows:
        _row(t[rr], b, r0 + rr, c0, c1, diag, H, V, Y, tmp, correct, multiply)
        rr += 1


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
        tmp = np.empty((4, width), dtype=np.float64)
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
                _tile(t, rows, b, r0, c0, c1, diag, H, V, Y, tmp, correct, False)
                for rr in range(rows):
                    for cc in range(rr + 1, cols):
                        m = (t[rr, cc] + t[cc, rr]) * 0.5
                        t[rr, cc] = m
                        t[cc, rr] = m
                _tile(t, rows, b, r0, c0, c1, diag, H, V, Y, tmp, False, multiply)
            else:
                _tile(t, rows, b, r0, c0, c1, diag, H, V, Y, tmp, correct, multiply)
