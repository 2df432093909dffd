"""Callbacks that tests use to interrupt a fit."""

from __future__ import annotations

import lightning as L


class StopAfter(L.Callback):
    """Simulate an interruption: stop at the end of epoch ``epoch`` (last.ckpt is written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True
