"""Pure helpers of the LightningModule."""

from __future__ import annotations

from types import SimpleNamespace

from rlekf.data.dataset import GroupedBatchSampler
from rlekf.training.module import _rescale_position


def _order(world: int, rank: int, n_frames: int = 40) -> list[list[int]]:
    s = GroupedBatchSampler(
        [8] * n_frames, batch_size=2, shuffle=False, num_replicas=world, rank=rank
    )
    return list(s)


def test_rescaled_position_skips_exactly_the_batches_trained_before():
    # 2 ranks trained 3 batches each = the first 6 batches of the epoch's order
    epoch, done = _rescale_position((4, 3), 2, SimpleNamespace(world_size=1))
    assert (epoch, done) == (4, 6)
    trained = [b for r in range(2) for b in _order(2, r)[:3]]
    assert sorted(map(tuple, trained)) == sorted(map(tuple, _order(1, 0)[:done]))
    # 1 rank -> 3 ranks: 6 batches done = 2 per rank
    assert _rescale_position((0, 6), 1, SimpleNamespace(world_size=3)) == (0, 2)
    # same world size or nothing done: unchanged
    assert _rescale_position((2, 5), 2, SimpleNamespace(world_size=2)) == (2, 5)
    # not divisible: round down (the remainder is trained again)
    assert _rescale_position((0, 5), 1, SimpleNamespace(world_size=2)) == (0, 2)
