"""Callbacks: a one-line summary per epoch (wall-clock, metrics, Kalman state)."""

from __future__ import annotations

import logging
import os
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["EpochSummary", "LastCheckpoint"]

log = logging.getLogger(__name__)


class EpochSummary(L.Callback):
    """Print ``epoch, wall-clock, val energy/force RMSE[, λ, Kalman updates]`` after validation.

    Energies in eV/atom, forces in eV/Å. Readable in log files, unlike a progress bar.
    """

    def __init__(self) -> None:
        self.t0: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.t0 is None:
            return
        # wall-clock since the start of fit, in the same row as the validation metrics
        # (rlekf-report: time to a target RMSE, learning curves against time)
        pl_module.log(
            "time/elapsed_s", time.perf_counter() - self.t0, on_step=False, on_epoch=True
        )

    @rank_zero_only
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.t0 is None:
            return
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch}", f"{time.perf_counter() - self.t0:.1f} s"]
        for key in ("val/energy_rmse", "val/force_rmse", "val/virial_rmse"):
            if key in m:
                parts.append(f"{key}={float(m[key]):.4g}")
        opt = trainer.optimizers[0] if trainer.optimizers else None
        if opt is not None and hasattr(opt, "n_updates"):
            parts.append(f"lambda={opt.lam:.6f} kf_updates={opt.n_updates}")
        log.info(" | ".join(parts))


class LastCheckpoint(L.Callback):
    """Keep ``<dirpath>/last.ckpt`` with everything needed to resume exactly.

    Rewritten every ``every_n_steps`` optimizer steps (a Kalman batch makes 1 + n_select /
    group_size steps) and at the end of every training epoch, through the trainer's checkpoint
    plugin (atomic with :class:`~rlekf.training.checkpoint.AtomicCheckpointIO`). A crash loses at
    most one interval; a run resumed from a mid-epoch checkpoint skips the batches it had done.

    Args:
        dirpath: folder of the checkpoint.
        every_n_steps: optimizer steps between writes (0: only at epoch ends).
        filename: file name inside ``dirpath``.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 500, filename: str = "last.ckpt"):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = dirpath
        self.every_n_steps = int(every_n_steps)
        self.filename = filename
        self._last_step = -1
        self._next_step = self.every_n_steps

    @property
    def path(self) -> str:
        return os.path.join(self.dirpath, self.filename)

    def _save(self, trainer) -> None:
        if trainer.global_step == self._last_step or trainer.sanity_checking:
            return
        trainer.save_checkpoint(self.path)
        self._last_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        n = self.every_n_steps
        self._next_step = (trainer.global_step // n + 1) * n if n else 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.every_n_steps or trainer.global_step < self._next_step:
            return
        n = self.every_n_steps
        self._next_step = (trainer.global_step // n + 1) * n
        if batch_idx + 1 < trainer.num_training_batches:  # the epoch end saves anyway
            self._save(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._save(trainer)
