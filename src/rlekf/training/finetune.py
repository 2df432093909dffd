"""``FineTuneInit``: start a new run's optimizer from a trained checkpoint (``ckpt_init``).

The weights, descriptor statistics and energy bias are loaded into the model before the
trainer is built (:func:`rlekf.finetune.read_init_checkpoint`); this callback loads the
optimizer state once the optimizer exists (``on_fit_start``), as
:func:`rlekf.finetune.init_optimizer` says, and records the origin in every checkpoint the
run writes (``checkpoint["finetune"]``). A resumed run (``ckpt_path``) restores its own state
instead: the callback then does nothing at fit start.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L

from rlekf.finetune import FINETUNE_KEY, init_optimizer

__all__ = ["FineTuneInit"]

log = logging.getLogger(__name__)


class FineTuneInit(L.Callback):
    """Load a trained run's optimizer state into a new run (see module docstring).

    Args:
        optimizer_state: the checkpoint's optimizer state dict (``None``: weights only).
        record: what to store under ``checkpoint["finetune"]`` (plain Python values).
        covariance: ``keep``, ``reset`` or ``inflate``
            (:data:`rlekf.finetune.COVARIANCE_POLICIES`).
        inflate: the factor of ``inflate``.
        lambda0: restart the forgetting factor at this value (``None``: the checkpoint's).
        where: the checkpoint's name, for messages.
    """

    def __init__(
        self,
        optimizer_state: dict[str, Any] | None,
        record: dict[str, Any],
        *,
        covariance: str = "keep",
        inflate: float | None = None,
        lambda0: float | None = None,
        where: str = "the checkpoint",
    ) -> None:
        self._state = optimizer_state
        self.record = dict(record)
        self.covariance, self.inflate, self.lambda0 = covariance, inflate, lambda0
        self.where = where

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path:  # a resume restores the run's own optimizer state afterwards
            self._state = None
            return
        if not trainer.optimizers:
            raise RuntimeError("FineTuneInit: the trainer has no optimizer at fit start")
        what = init_optimizer(
            trainer.optimizers[0],
            self._state,
            covariance=self.covariance,
            inflate=self.inflate,
            lambda0=self.lambda0,
            where=self.where,
        )
        self._state = None  # P can be large: keep no second copy
        log.info("fine-tuning from %s: %s", self.where, what)
        self.record["optimizer"] = what

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[FINETUNE_KEY] = dict(self.record)
