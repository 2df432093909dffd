"""Layer reorganization for RLEKF: "gather small, split big".

The parameters are walked in registration order. Each tensor is flattened with
``p.reshape(-1)`` (row-major order of the *stored* tensor) and the flattened tensors are
concatenated into one vector ``w`` of length ``N``. The rule of the reference code bases
(PWMLFF ``LKF``, DeePMD-kit ``LKF``, paper-era ``L1KalmanFilter``) then cuts ``w`` into
contiguous blocks:

1. **Gather**: keep a running sum ``s``. For the next tensor with ``n_k`` elements, if
   ``s + n_k > N_b`` close the current group (only when ``s > 0``, so no empty group is ever
   emitted) and start a new one with ``s = n_k``; otherwise ``s += n_k``. Close the last group
   at the end.
2. **Split**: a group of ``g >= N_b`` elements (only a single tensor can exceed ``N_b``)
   becomes ``ceil(g / N_b)`` contiguous blocks ``N_b, ..., N_b, remainder``.

Blocks never reorder parameters, so block ``i`` is the contiguous range
``w[offset_i : offset_i + numel_i]``. ``block_size=None`` gives one block of ``N`` elements
(the global EKF, GEKF).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["Block", "Segment", "partition_parameters", "partition_sizes", "validate_block_size"]


class Segment(NamedTuple):
    """A contiguous slice ``p.reshape(-1)[start:stop]`` of one parameter tensor.

    Attributes:
        param_index: Index of the tensor in the parameter sequence.
        start: First flat element (inclusive).
        stop: Last flat element (exclusive); ``stop > start``.
    """

    param_index: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        """Number of elements in the slice."""
        return self.stop - self.start


@dataclass(frozen=True)
class Block:
    """One diagonal block of the RLEKF covariance.

    Attributes:
        index: Position of the block in the partition (0-based).
        offset: Start of the block in the concatenated flat parameter vector ``w``.
        numel: Number of elements ``n_i`` of the block (``P_i`` is ``n_i x n_i``).
        segments: Slices of parameter tensors that make up the block, in order; their
            concatenation is ``w[offset : offset + numel]``.
    """

    index: int
    offset: int
    numel: int
    segments: tuple[Segment, ...]

    @property
    def param_indices(self) -> tuple[int, ...]:
        """Indices of the parameter tensors that contribute to this block."""
        return tuple(s.param_index for s in self.segments)


def validate_block_size(block_size: int | None) -> int | None:
    """Check ``block_size`` and return it as a Python ``int`` (or ``None``).

    Args:
        block_size: Maximum block size ``N_b`` (positive integer), or ``None`` for one block.

    Returns:
        The validated block size.

    Raises:
        ValueError: If ``block_size`` is not ``None`` or a positive integer.
    """
    if block_size is None:
        return None
    if isinstance(block_size, bool):
        raise ValueError(f"Invalid block_size: {block_size!r} (expected a positive int or None)")
    try:
        value = operator.index(block_size)
    except TypeError:
        raise ValueError(
            f"Invalid block_size: {block_size!r} (expected a positive int or None)"
        ) from None
    if value <= 0:
        raise ValueError(f"Invalid block_size: {block_size!r} (expected a positive int or None)")
    return value


def _validate_numels(numels: Sequence[int]) -> list[int]:
    out = []
    for k, n in enumerate(numels):
        if isinstance(n, bool):
            raise ValueError(f"numels[{k}] = {n!r} is not a non-negative int")
        try:
            value = operator.index(n)
        except TypeError:
            raise ValueError(f"numels[{k}] = {n!r} is not a non-negative int") from None
        if value < 0:
            raise ValueError(f"numels[{k}] = {n!r} is not a non-negative int")
        out.append(value)
    return out


def _gather(numels: Sequence[int], block_size: int) -> list[tuple[int, int]]:
    """Greedy gather step; returns groups as ``(flat_start, flat_stop)`` ranges of ``w``."""
    groups: list[tuple[int, int]] = []
    start = 0  # flat offset where the current group starts
    running = 0  # elements in the current group
    for n in numels:
        if running + n > block_size:
            if running > 0:
                groups.append((start, start + running))
            start += running
            running = n
        else:
            running += n
    if running > 0:
        groups.append((start, start + running))
    return groups


def partition_parameters(numels: Sequence[int], block_size: int | None) -> tuple[Block, ...]:
    """Partition parameters into RLEKF blocks with the "gather small, split big" rule.

    Args:
        numels: Number of elements of each parameter tensor, in registration order.
            Zero-element tensors are allowed and belong to no block.
        block_size: Maximum block size ``N_b``; ``None`` for a single block of all ``N``
            elements (GEKF).

    Returns:
        The blocks in order. Their sizes sum to ``N = sum(numels)``; every block is non-empty
        and (for an integer ``block_size``) has at most ``block_size`` elements. An empty
        tuple when ``N == 0``.

    Raises:
        ValueError: If ``block_size`` or an entry of ``numels`` is invalid.
    """
    block_size = validate_block_size(block_size)
    sizes = _validate_numels(numels)
    total = sum(sizes)
    if total == 0:
        return ()

    # Block boundaries in the flat vector w.
    ranges: list[tuple[int, int]] = []
    if block_size is None:
        ranges.append((0, total))
    else:
        for g_start, g_stop in _gather(sizes, block_size):
            for b_start in range(g_start, g_stop, block_size):
                ranges.append((b_start, min(b_start + block_size, g_stop)))

    # Flat range of each parameter tensor in w.
    param_starts = []
    acc = 0
    for n in sizes:
        param_starts.append(acc)
        acc += n

    blocks: list[Block] = []
    k = 0  # first parameter that may overlap the current block
    for index, (b_start, b_stop) in enumerate(ranges):
        segments: list[Segment] = []
        while k < len(sizes) and param_starts[k] + sizes[k] <= b_start:
            k += 1
        j = k
        while j < len(sizes) and param_starts[j] < b_stop:
            lo = max(b_start, param_starts[j]) - param_starts[j]
            hi = min(b_stop, param_starts[j] + sizes[j]) - param_starts[j]
            if hi > lo:
                segments.append(Segment(j, lo, hi))
            j += 1
        blocks.append(Block(index, b_start, b_stop - b_start, tuple(segments)))
    return tuple(blocks)


def partition_sizes(numels: Sequence[int], block_size: int | None) -> list[int]:
    """Block sizes ``[n_1, ..., n_L]`` of :func:`partition_parameters`.

    Args:
        numels: Number of elements of each parameter tensor, in registration order.
        block_size: Maximum block size ``N_b``, or ``None`` for one block.

    Returns:
        The block sizes in order; they sum to ``sum(numels)`` and none is zero.

    Example:
        >>> cu = [25, 25, 625, 25, 625, 25, 20000, 50, 2500, 50, 50, 2500, 50, 50, 50, 1]
        >>> partition_sizes(cu, 10240)
        [1350, 10240, 9760, 5301]
    """
    return [b.numel for b in partition_parameters(numels, block_size)]
