"""Symmetric covariance blocks stored as their lower tiles, updated in one pass per update.

A covariance block ``P`` (``n x n``, symmetric positive semi-definite) is held as

.. code-block:: text

    P = c * (S - V V^T)

* ``S``: the square tiles of edge ``T`` on and below the diagonal (diagonal tiles whole, both
  triangles; the last row/column of tiles is narrower when ``T`` does not divide ``n``),
  packed one after another in row-major tile order ``(0,0), (1,0), (1,1), (2,0), ...`` into a
  flat buffer of :func:`lower_tile_numel` ``(n, T) ~ n**2/2 + n*T/2`` elements;
* ``c``: a float64 scale; the forgetting factor is folded into it (``P / lam`` is
  ``c <- c / lam``, no pass over ``S``);
* ``V``: an optional pending correction ``(n x k)`` that the next sweep applies tile by tile
  while it computes ``S H`` (the deferred correction: one read and one write of ``S`` per
  Kalman update instead of a read for ``P H`` and a read + write for the correction).

Equal-size blocks form a :class:`TileGroup`: their buffers are the rows of one ``(B, m)``
tensor, so each tile of the group is one ``(B, rows, cols)`` strided view and every step of a
sweep is one batched BLAS call (``baddbmm``) for all ``B`` blocks. A group of one block uses
matrix-vector kernels for rank-1 sweeps.

The pure update math on the per-block results (innovation, gains, pending factors) lives in
:mod:`rlekf.optim.functional` (:func:`~rlekf.optim.functional.tiled_rank1_factors`,
:func:`~rlekf.optim.functional.tiled_rank_k_factors`); this module only stores and traverses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlekf.optim import tile_kernel

__all__ = [
    "DEFAULT_TILE",
    "DEFAULT_TILE_CUDA",
    "KERNELS",
    "TileGroup",
    "lower_tile_numel",
    "pack_lower_tiles",
    "packed_block_size",
    "tile_edges",
    "unpack_lower_tiles",
]

# Tile edge in elements on the CPU (chosen by `make bench`, README) and on CUDA (fewer, larger
# tiles: each tile costs three kernel launches).
DEFAULT_TILE = 256
DEFAULT_TILE_CUDA = 2048
# sweep implementations of a TileGroup
KERNELS = ("torch", "fused")


def tile_edges(n: int, tile: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of the tile rows/columns of an ``n x n`` block."""
    if n <= 0 or tile <= 0:
        raise ValueError(f"tile_edges needs n > 0 and tile > 0, got n={n}, tile={tile}")
    return [(s, min(s + tile, n)) for s in range(0, n, tile)]


def _layout(n: int, tile: int) -> list[tuple[int, int, int, int, int, int, int]]:
    """``(r, c, r0, r1, c0, c1, offset)`` of every lower tile, in packing order."""
    edges = tile_edges(n, tile)
    out = []
    off = 0
    for r, (r0, r1) in enumerate(edges):
        for c in range(r + 1):
            c0, c1 = edges[c]
            out.append((r, c, r0, r1, c0, c1, off))
            off += (r1 - r0) * (c1 - c0)
    return out


def lower_tile_numel(n: int, tile: int) -> int:
    """Elements stored for one ``n x n`` block: the tiles on and below the diagonal."""
    edges = tile_edges(n, tile)
    sizes = [b - a for a, b in edges]
    return sum(sizes[r] * sizes[c] for r in range(len(sizes)) for c in range(r + 1))


def packed_block_size(numel: int, tile: int) -> int | None:
    """The ``n`` whose packed lower tiles have ``numel`` elements, or ``None``."""
    lo, hi = 1, max(1, int(numel))
    while lo <= hi:  # lower_tile_numel grows strictly with n
        mid = (lo + hi) // 2
        m = lower_tile_numel(mid, tile)
        if m == numel:
            return mid
        if m < numel:
            lo = mid + 1
        else:
            hi = mid - 1
    return None


def pack_lower_tiles(dense: Tensor, tile: int) -> Tensor:
    """The packed lower tiles (1-D, a copy) of a square matrix ``dense`` (``(n, n)``)."""
    if dense.dim() != 2 or dense.shape[0] != dense.shape[1]:
        raise ValueError(f"pack_lower_tiles needs a square matrix, got {tuple(dense.shape)}")
    n = dense.shape[0]
    out = torch.empty(lower_tile_numel(n, tile), dtype=dense.dtype, device=dense.device)
    for _, _, r0, r1, c0, c1, off in _layout(n, tile):
        out[off : off + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0).copy_(dense[r0:r1, c0:c1])
    return out


def unpack_lower_tiles(packed: Tensor, n: int, tile: int) -> Tensor:
    """The full symmetric ``(n, n)`` matrix of packed lower tiles (the upper triangle of
    each off-diagonal tile pair is the transpose; diagonal tiles are taken as stored)."""
    if packed.dim() != 1 or packed.numel() != lower_tile_numel(n, tile):
        raise ValueError(
            f"packed lower tiles of a {n} x {n} block with tile {tile} need "
            f"{lower_tile_numel(n, tile)} elements, got shape {tuple(packed.shape)}"
        )
    out = torch.empty(n, n, dtype=packed.dtype, device=packed.device)
    for r, c, r0, r1, c0, c1, off in _layout(n, tile):
        t = packed[off : off + (r1 - r0) * (c1 - c0)].view(r1 - r0, c1 - c0)
        out[r0:r1, c0:c1].copy_(t)
        if r != c:
            out[c0:c1, r0:r1].copy_(t.mT)
    return out


class TileGroup:
    """``B`` symmetric ``n x n`` blocks of one size, as lower tiles in one ``(B, m)`` buffer.

    Holds only ``S`` (see the module docstring); the scales ``c`` and pending corrections
    ``V`` belong to the caller (the optimizer), which passes ``V`` to :meth:`sweep_`.

    Args:
        n: Block size.
        count: Number of blocks ``B``.
        tile: Tile edge ``T``.
        dtype: Storage dtype of ``S`` (float64 or float32).
        device: Where ``S`` lives.
        diag: Initial value of the diagonal (``S = diag * I``).
        kernel: ``"torch"`` (three library calls per tile, any device) or ``"fused"`` (one
            compiled loop nest per sweep, :mod:`rlekf.optim.tile_kernel`; CPU only, needs
            Numba).
    """

    def __init__(
        self,
        n: int,
        count: int,
        tile: int,
        dtype: torch.dtype,
        device: torch.device | str,
        diag: float = 1.0,
        kernel: str = "torch",
    ) -> None:
        if count <= 0:
            raise ValueError(f"TileGroup needs count > 0, got {count}")
        if kernel not in KERNELS:
            raise ValueError(f"Invalid kernel: {kernel!r} (expected one of {KERNELS})")
        self.n, self.count, self.tile = int(n), int(count), int(tile)
        self.layout = _layout(self.n, self.tile)
        self.numel = lower_tile_numel(self.n, self.tile)
        self.buffer = torch.zeros(self.count, self.numel, dtype=dtype, device=device)
        self.tiles: list[Tensor] = []  # (B, rows, cols) views, in layout order
        for _, _, r0, r1, c0, c1, off in self.layout:
            size = (r1 - r0) * (c1 - c0)
            self.tiles.append(self.buffer[:, off : off + size].view(self.count, r1 - r0, c1 - c0))
        self._diag_tiles = [
            t for (r, c, *_), t in zip(self.layout, self.tiles, strict=True) if r == c
        ]
        for t in self._diag_tiles:
            t.diagonal(dim1=1, dim2=2).fill_(diag)
        self._tile_views = _TileViews(self)
        self._vectors: dict[tuple[str, int], _TileVectors] = {}
        self._diag_index: Tensor | None = None
        self.kernel = kernel
        if kernel == "fused":
            if self.buffer.device.type != "cpu":
                raise ValueError("the fused tile kernel runs on the CPU only (kernel='torch')")
            if not tile_kernel.available():
                raise ImportError("the fused tile kernel needs Numba (pip install numba)")
            self._lay = tile_kernel.layout_arrays(self.layout)
            self._bounds = tile_kernel.chunk_bounds(self._lay, self.count)

    @property
    def dtype(self) -> torch.dtype:
        """Storage dtype of ``S``."""
        return self.buffer.dtype

    @property
    def device(self) -> torch.device:
        """Device of ``S``."""
        return self.buffer.device

    @property
    def nbytes(self) -> int:
        """Bytes of the stored tiles."""
        return self.buffer.numel() * self.buffer.element_size()

    # ------------------------------------------------------------------ one pass
    def vectors(self, k: int, role: str = "pending") -> _TileVectors:
        """A persistent buffer of ``k`` vectors per block with its per-tile views (``role``:
        one buffer per role and ``k``; the optimizer writes pending corrections into
        ``"pending"`` with :meth:`_TileVectors.set_`)."""
        key = (role, k)
        ws = self._vectors.get(key)
        if ws is None:
            ws = self._vectors[key] = _TileVectors(self, k)
        return ws

    @torch.no_grad()
    def sweep_(
        self, H: Tensor, V: _TileVectors | None = None, *, symmetrize: bool = False
    ) -> Tensor:
        """Apply the pending correction ``S <- S - V V^T`` and return ``S H``, in one pass.

        Every tile is read and written once: the correction is subtracted from it, then it is
        used (while in cache) for its share of ``S H`` and, off the diagonal, of its transpose.
        The per-tile views of ``H``, ``Y`` and ``V`` are built once per ``k`` (no slicing per
        update).

        Args:
            H: ``(B, n, k)`` in the storage dtype.
            V: The pending factors (``k'`` vectors per block, from :meth:`vectors`), or ``None``.
            symmetrize: Also replace every diagonal tile by ``(t + t^T) / 2`` after its
                correction (the off-diagonal tiles are the only copy of their entries, so
                only diagonal tiles can drift from symmetry through rounding).

        Returns:
            ``Y = S H`` (after the correction), ``(B, n, k)`` in the storage dtype (float64
            with the fused kernel), a copy.
        """
        B, n, k = H.shape
        if B != self.count or n != self.n:
            raise ValueError(
                f"sweep_: H has shape {tuple(H.shape)}, expected ({self.count}, {self.n}, k)"
            )
        return self.sweep_rows_(H.mT, V, symmetrize=symmetrize).mT.clone()

    @torch.no_grad()
    def sweep_rows_(
        self, Hk: Tensor, V: _TileVectors | None = None, *, symmetrize: bool = False
    ) -> Tensor:
        """:meth:`sweep_` with ``H`` given and ``Y`` returned as ``(B, k, n)`` rows.

        Returns:
            ``Y``: with the torch kernel in the storage dtype, the group's persistent ``"Y"``
            buffer for this ``k`` (overwritten by the next sweep with the same ``k``; copy it
            to keep it); with the fused kernel a new float64 tensor (accumulated in float64).
        """
        B, k, n = Hk.shape
        if B != self.count or n != self.n:
            raise ValueError(
                f"sweep_rows_: H has shape {tuple(Hk.shape)}, expected ({self.count}, k, {self.n})"
            )
        if self.kernel == "fused":
            pending = None if V is None else V.buf
            H64 = Hk.to(torch.float64).contiguous()
            return tile_kernel.sweep(
                self.buffer, self._lay, self._bounds, H64, pending, symmetrize
            )
        hv = self.vectors(k, "H")
        yv = self.vectors(k, "Y")
        hv.buf.copy_(Hk)
        yv.buf.zero_()
        tv = self._tile_views
        # the multiply kernels depend on H alone (not on whether a correction is pending), so
        # a state flushed by a checkpoint continues with the same bits
        if hv.vec:  # rank 1, one block: matrix-vector kernels
            for i, (diag, t, tT) in enumerate(tv.vec):
                if V is not None:
                    _correct_(tv, V, i)
                if diag and symmetrize:
                    t.copy_((t + tT).mul_(0.5))
                yv.rows1[i].addmv_(t, hv.cols1[i])
                if not diag:
                    yv.cols1[i].addmv_(tT, hv.rows1[i])
            return yv.buf
        for i, (diag, t, tT) in enumerate(tv.batched):
            if V is not None:
                _correct_(tv, V, i)
            if diag and symmetrize:
                t.copy_((t + tT).mul_(0.5))
            # (Y_R)^T += (H_C)^T t^T and (Y_C)^T += (H_R)^T t, with k contiguous rows
            yv.rows[i].baddbmm_(hv.cols[i], tT)
            if not diag:
                yv.cols[i].baddbmm_(hv.rows[i], t)
        return yv.buf

    @torch.no_grad()
    def apply_(self, V: _TileVectors) -> None:
        """``S <- S - V V^T`` (a flush of the pending correction).

        Uses the kernels a sweep would use for the same ``V``, so flushing and leaving the
        correction to the next sweep give the same bits.
        """
        if self.kernel == "fused":
            tile_kernel.apply(self.buffer, self._lay, self._bounds, V.buf)
            return
        for i in range(len(self.layout)):
            _correct_(self._tile_views, V, i)

    # ------------------------------------------------------------------ access
    def packed(self, j: int) -> Tensor:
        """Block ``j``'s packed lower tiles (a view of the storage)."""
        return self.buffer[j]

    def diagonal(self) -> Tensor:
        """``diag(S)`` of every block, ``(B, n)`` (a copy; one gather)."""
        idx = self._diag_index
        if idx is None:
            pos = []
            for r, c, r0, r1, c0, c1, off in self.layout:
                if r == c:
                    w = c1 - c0
                    pos.extend(off + j * w + j for j in range(r1 - r0))
            idx = self._diag_index = torch.tensor(pos, dtype=torch.long, device=self.device)
        return self.buffer.index_select(1, idx)

    @torch.no_grad()
    def add_diagonal_(self, j: int, value: float) -> None:
        """``S_j <- S_j + value * I``."""
        for t in self._diag_tiles:
            t[j].diagonal().add_(value)

    @torch.no_grad()
    def symmetrize_diagonal_(self) -> None:
        """Replace every diagonal tile by ``(t + t^T) / 2``."""
        for t in self._diag_tiles:
            t.copy_((t + t.mT).mul_(0.5))

    def dense(self, j: int) -> Tensor:
        """Block ``j``'s ``S`` as a full ``(n, n)`` matrix (a copy)."""
        return unpack_lower_tiles(self.buffer[j], self.n, self.tile)

    @torch.no_grad()
    def load_(self, j: int, packed: Tensor) -> None:
        """Set block ``j``'s ``S`` from packed lower tiles (same ``n`` and tile)."""
        if packed.dim() != 1 or packed.numel() != self.numel:
            raise ValueError(
                f"packed tiles of shape {tuple(packed.shape)} do not fit a {self.n} x {self.n} "
                f"block with tile {self.tile} ({self.numel} elements)"
            )
        self.buffer[j].copy_(packed)


class _TileViews:
    """Per-tile views of a group's storage: ``(is_diagonal, tile, tile^T)``, batched
    ``(B, rows, cols)`` and, for a one-block group, 2-D."""

    def __init__(self, g: TileGroup) -> None:
        self.batched = [(r == c, t, t.mT) for (r, c, *_), t in zip(g.layout, g.tiles, strict=True)]
        self.vec = [(d, t[0], tT[0]) for d, t, tT in self.batched] if g.count == 1 else []


class _TileVectors:
    """A persistent buffer of ``k`` vectors per block of a group, stored ``(B, k, n)`` (each
    vector contiguous: MKL/OpenBLAS multiply a tile by a few contiguous rows several times
    faster than by ``(n, k)`` columns), and its views per tile: ``rows[i]`` and ``cols[i]`` are
    the row and column ranges of tile ``i`` (``(B, k, len)``); with ``B = k = 1`` also 1-D
    ``rows1``/``cols1``."""

    def __init__(self, g: TileGroup, k: int) -> None:
        self.buf = torch.zeros(g.count, k, g.n, dtype=g.dtype, device=g.device)
        self.vec = g.count == 1 and k == 1
        flat = self.buf[0, 0]
        self.rows, self.cols, self.rows_t, self.rows1, self.cols1 = [], [], [], [], []
        for _, _, r0, r1, c0, c1, _ in g.layout:
            self.rows.append(self.buf[:, :, r0:r1])
            self.rows_t.append(self.buf[:, :, r0:r1].mT)
            self.cols.append(self.buf[:, :, c0:c1])
            if self.vec:
                self.rows1.append(flat[r0:r1])
                self.cols1.append(flat[c0:c1])

    def set_(self, j: int, x: Tensor) -> None:
        """Block ``j``'s vectors from an ``(n, k)`` matrix (cast to the storage dtype)."""
        self.buf[j].copy_(x.mT)


def _correct_(tv: _TileViews, V: _TileVectors, i: int) -> None:
    """Tile ``i``'s share of ``S <- S - V V^T``: ``t -= V[rows] V[cols]^T``."""
    if V.vec:
        tv.vec[i][1].addr_(V.rows1[i], V.cols1[i], alpha=-1.0)
    else:
        tv.batched[i][1].baddbmm_(V.rows_t[i], V.cols[i], alpha=-1.0)


def group_blocks(sizes: Sequence[int], limit: int | None) -> list[list[int]]:
    """Indices (into ``sizes``) of the blocks of each group: blocks of equal size up to
    ``limit`` together (``None``: any size; ``0``: none), every other block alone; groups in
    order of their first block."""
    groups: dict[int, list[int]] = {}
    out: list[list[int]] = []
    for i, n in enumerate(sizes):
        if limit is not None and n > limit:
            out.append([i])
        elif n in groups:
            groups[n].append(i)
        else:
            groups[n] = [i]
            out.append(groups[n])
    return out
