"""Tests for the "gather small, split big" block partition (reference section 2)."""

from __future__ import annotations

import random

import pytest

from rlekf.optim import Block, partition_parameters, partition_sizes
from rlekf.optim.partition import Segment

# Per-layer order (weight, bias, [timestep]) as in DeePMD-kit and current PWMLFF (§2.2).
EMBED = [25, 25, 625, 25, 625, 25]
FIT = [20000, 50, 2500, 50, 50, 2500, 50, 50, 50, 1]
CU = EMBED + FIT
H2O = EMBED * 4 + FIT * 2
# Paper-era order: all weights, then all biases, then all timesteps (§2.3).
CU_WEIGHTS_FIRST = [25, 625, 625, 25, 25, 25] + [20000, 2500, 2500, 50, 50, 50, 50, 1, 50, 50]


@pytest.mark.parametrize(
    ("numels", "block_size", "expected"),
    [
        (CU, 5120, [1350, 5120, 5120, 5120, 4640, 2650, 2651]),
        (CU, 10240, [1350, 10240, 9760, 5301]),
        (
            H2O,
            5120,
            [4750, 650, 5120, 5120, 5120, 4640, 2650, 2651, 5120, 5120, 5120, 4640, 2650, 2651],
        ),
        (H2O, 10240, [5400, 10240, 9760, 5301, 10240, 9760, 5301]),
        (CU_WEIGHTS_FIRST, 10240, [1350, 10240, 9760, 5301]),
        (CU_WEIGHTS_FIRST, 5120, [1350, 5120, 5120, 5120, 4640, 5100, 201]),
    ],
    ids=["cu-5120", "cu-10240", "h2o-5120", "h2o-10240", "cu-wfirst-10240", "cu-wfirst-5120"],
)
def test_reference_tables(numels: list[int], block_size: int, expected: list[int]) -> None:
    assert sum(CU) == 26651 and sum(H2O) == 56002
    assert partition_sizes(numels, block_size) == expected


def test_h2o_sum_of_squares_matches_reference_memory() -> None:
    # §2.2: sum n_i^2 = 2.51e8 at 5120 and 4.86e8 at 10240 for H2O.
    assert sum(n * n for n in partition_sizes(H2O, 5120)) == pytest.approx(2.51e8, rel=5e-3)
    assert sum(n * n for n in partition_sizes(H2O, 10240)) == pytest.approx(4.86e8, rel=5e-3)


def test_first_tensor_larger_than_block_gives_no_empty_block() -> None:
    # The paper-era code emitted a zero-size first block here (§1.7).
    assert partition_sizes([20000, 50, 50], 5120) == [5120, 5120, 5120, 4640, 100]
    assert partition_sizes([7, 1], 3) == [3, 3, 1, 1]
    assert partition_sizes([10], 5) == [5, 5]


def test_gathered_group_can_fill_a_block_exactly() -> None:
    assert partition_sizes([3, 3, 3], 6) == [6, 3]
    assert partition_sizes([2, 2, 2, 1], 6) == [6, 1]


def test_none_gives_one_block() -> None:
    assert partition_sizes(CU, None) == [26651]
    (block,) = partition_parameters([3, 0, 4], None)
    assert block.numel == 7 and block.offset == 0
    assert block.segments == (Segment(0, 0, 3), Segment(2, 0, 4))


def test_block_segments_describe_flat_slices() -> None:
    # numels 15, 5, 5, 1 at N_b = 6: groups [15], [5], [5, 1] -> blocks 6, 6, 3, 5, 6.
    blocks = partition_parameters([15, 5, 5, 1], 6)
    assert [b.numel for b in blocks] == [6, 6, 3, 5, 6]
    assert blocks[0] == Block(0, 0, 6, (Segment(0, 0, 6),))
    assert blocks[2] == Block(2, 12, 3, (Segment(0, 12, 15),))
    assert blocks[4].segments == (Segment(2, 0, 5), Segment(3, 0, 1))
    assert blocks[4].param_indices == (2, 3)
    assert blocks[4].offset == 20


def test_empty_and_zero_sized_tensors() -> None:
    assert partition_sizes([], 4) == []
    assert partition_sizes([0, 0], 4) == []
    assert partition_sizes([0, 5, 0, 2], 4) == [4, 1, 2]


@pytest.mark.parametrize("bad", [0, -1, 1.5, "5120", True])
def test_invalid_block_size(bad: object) -> None:
    with pytest.raises(ValueError, match="block_size"):
        partition_sizes([3, 4], bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[-1], [1.5], ["3"]])
def test_invalid_numels(bad: list[object]) -> None:
    with pytest.raises(ValueError, match="numels"):
        partition_sizes(bad, 4)  # type: ignore[arg-type]


def _oracle_sizes(numels: list[int], block_size: int | None) -> list[int]:
    """Straightforward restatement of the §2.1 rule, used as an oracle."""
    if block_size is None:
        return [sum(numels)] if sum(numels) else []
    groups, s = [], 0
    for n in numels:
        if s + n > block_size:
            if s > 0:
                groups.append(s)
            s = n
        else:
            s += n
    if s > 0:
        groups.append(s)
    out = []
    for g in groups:
        full, rem = divmod(g, block_size)
        out += [block_size] * full + ([rem] if rem else [])
    return out


def test_random_partitions_are_consistent() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        numels = [
            rng.choice([0, rng.randint(1, 30), rng.randint(1, 3000)])
            for _ in range(rng.randint(1, 25))
        ]
        block_size = rng.choice([None, rng.randint(1, 64), rng.randint(1, 5000)])
        blocks = partition_parameters(numels, block_size)
        sizes = [b.numel for b in blocks]
        assert sum(sizes) == sum(numels)
        assert all(n > 0 for n in sizes)
        if block_size is not None:
            assert all(n <= block_size for n in sizes)
        assert sizes == _oracle_sizes(numels, block_size)
        # Segments tile the concatenated flat vector contiguously and in order.
        position = (0, 0)  # (param_index, flat index) of the next expected element
        for i, b in enumerate(blocks):
            assert b.index == i and b.offset == sum(sizes[:i])
            assert sum(s.numel for s in b.segments) == b.numel
            for s in b.segments:
                assert s.stop > s.start
                k, j = position
                while j == numels[k] and (k, j) != (s.param_index, s.start):
                    k, j = k + 1, 0
                assert (s.param_index, s.start) == (k, j)
                position = (k, s.stop)
        last = max((k for k, n in enumerate(numels) if n), default=None)
        assert position == ((0, 0) if last is None else (last, numels[last]))
