"""A callback for the DDP test: each rank writes a checksum of its weights at the end of fit."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class WeightChecksum(L.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer, pl_module) -> None:
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.model.parameters()])
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(
            {"weights": flat, "world": trainer.world_size, "steps": trainer.global_step},
            self.dirpath / f"rank{trainer.global_rank}.pt",
        )
