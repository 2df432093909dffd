"""Optimizer factories named by ``configs/optim/*.yaml`` (``_target_``, ``_partial_: true``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from rlekf.optim.distributed import ShardedRLEKF
from rlekf.optim.rlekf import RLEKF

__all__ = ["kalman_filter"]


def kalman_filter(
    params: Iterable[torch.nn.Parameter], *, sharded: bool | str = "auto", **kwargs
) -> RLEKF:
    """:class:`~rlekf.optim.RLEKF`, or :class:`~rlekf.optim.ShardedRLEKF` under data parallelism.

    A plain ``RLEKF`` on several ranks would update each rank's copy of the weights with its own
    data and let the replicas drift apart; ``ShardedRLEKF`` shards ``P`` across the ranks and
    averages each measurement's gradient and error over them.

    Args:
        params: the parameters to train.
        sharded: ``"auto"`` (default): ``ShardedRLEKF`` when a process group of more than one
            rank is initialised (``trainer=ddp`` on several devices), ``RLEKF`` otherwise;
            ``True`` / ``False`` force one or the other.
        **kwargs: the optimizer's keywords (``block_size``, ``lambda0``, ``nu``, ``p0``, ...).

    Raises:
        ValueError: ``sharded`` is neither ``"auto"`` nor a bool.
    """
    if sharded == "auto":
        sharded = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    elif not isinstance(sharded, bool):
        raise ValueError(f"sharded must be 'auto', true or false, got {sharded!r}")
    return (ShardedRLEKF if sharded else RLEKF)(params, **kwargs)
