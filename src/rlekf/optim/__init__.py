"""RLEKF optimizer: block partition, pure update math and the torch.optim class."""

from __future__ import annotations

from rlekf.optim.functional import RLEKFUpdate, rlekf_update, symmetrize_
from rlekf.optim.partition import Block, Segment, partition_parameters, partition_sizes
from rlekf.optim.rlekf import RLEKF

__all__ = [
    "RLEKF",
    "Block",
    "RLEKFUpdate",
    "Segment",
    "partition_parameters",
    "partition_sizes",
    "rlekf_update",
    "symmetrize_",
]
