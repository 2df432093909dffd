"""RLEKF optimizer: block partition, pure update math and the torch.optim class."""

from __future__ import annotations

from rlekf.optim.distributed import ShardedRLEKF, assign_blocks
from rlekf.optim.functional import (
    RLEKFRankKUpdate,
    RLEKFUpdate,
    rlekf_update,
    rlekf_update_rank_k,
    symmetrize_,
)
from rlekf.optim.partition import Block, Segment, partition_parameters, partition_sizes
from rlekf.optim.rlekf import RLEKF, state_covariance

__all__ = [
    "RLEKF",
    "Block",
    "RLEKFRankKUpdate",
    "RLEKFUpdate",
    "Segment",
    "ShardedRLEKF",
    "partition_parameters",
    "partition_sizes",
    "assign_blocks",
    "rlekf_update",
    "rlekf_update_rank_k",
    "state_covariance",
    "symmetrize_",
]
