"""Callbacks: a one-line summary per epoch (wall-clock, metrics, Kalman state)."""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["EpochSummary"]

log = logging.getLogger(__name__)


class EpochSummary(L.Callback):
    """Print ``epoch, wall-clock, val energy/force RMSE[, λ, Kalman updates]`` after validation.

    Energies in eV/atom, forces in eV/Å. Readable in log files, unlike a progress bar.
    """

    def __init__(self) -> None:
        self.t0: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()

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
