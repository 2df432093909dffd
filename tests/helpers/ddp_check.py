"""A callback for the DDP test: each rank writes a checksum of its weights at the end of fit."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch


class WeightChecksum(L.Callback):
    """Writes ``<dirpath>/rank<r>.pt`` (weights, world size, global step) on every rank.

    The file is written under a temporary name and renamed, and the ranks meet at a barrier
    afterwards: rank 0 (the process the test waits for) cannot exit before rank 1's file is
    complete.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.model.parameters()])
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"rank{trainer.global_rank}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save(
            {"weights": flat, "world": trainer.world_size, "steps": trainer.global_step}, tmp
        )
        os.replace(tmp, path)
        trainer.strategy.barrier("weight_checksum")
