"""Exponential moving average of the weights for validation and the best checkpoint.

A Kalman filter with a large gain fits each frame's energy almost exactly and moves the other
frames' energies by about as much (README "Frames of mixed sizes"): the weights jitter about
the solution from one update to the next. Averaging them over the last ~``1 / (1 - decay)``
batches (Polyak averaging; ``torch.optim.swa_utils``) takes out that jitter without touching
the training trajectory: the optimizer keeps updating the raw weights, and only validation,
the best-model checkpoint and what is evaluated from it see the average.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["WeightAverage"]

log = logging.getLogger(__name__)

#: key of the average's state in a full checkpoint (``last.ckpt``)
CHECKPOINT_KEY = "weight_average"


def batches_trained(checkpoint: dict[str, Any]) -> int:
    """Training batches completed before ``checkpoint`` was written (Lightning's fit-loop
    progress; 0 when the checkpoint holds no loop state)."""
    try:
        progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        return int(progress["total"]["completed"])
    except (KeyError, TypeError):
        return 0


class WeightAverage(L.Callback):
    """Validate and keep the best checkpoint on an exponential moving average of the weights.

    After every training batch (from batch ``start_batch`` on; the first averaged batch copies
    the weights) ``avg <- decay * avg + (1 - decay) * w`` over the parameters of
    ``pl_module.model`` (buffers, e.g. the descriptor statistics, are not averaged). During
    each validation of a fit the averaged parameters are swapped into the model, and they stay
    there until the next training batch starts, so the metrics (``val/*``), the checkpoint
    selection and the weights-only ``best_weights_*.ckpt`` all hold the average. Training
    itself is unchanged: the raw weights are put back, bit for bit, before every batch.

    Full checkpoints (``last.ckpt``) keep the raw weights in ``state_dict`` (what an exact
    resume needs) and the average under ``checkpoint["weight_average"]`` (``params``: name →
    tensor, ``n_averaged``, ``batches_seen``); resuming restores it. Evaluation, export and
    ``DPCalculator.from_checkpoint`` read ``state_dict``: the average from a best-weights file,
    the raw weights from ``last.ckpt``.

    Args:
        decay: EMA factor per training batch, in [0, 1); the average spans about
            ``1 / (1 - decay)`` batches (0: no averaging, the last weights).
        start_batch: training batches before the average starts (counted over the fit,
            resumes included).
    """

    def __init__(self, decay: float = 0.95, start_batch: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.decay = float(decay)
        self.start_batch = int(start_batch)
        self._average: AveragedModel | None = None
        self._raw: list[torch.Tensor] | None = None  # the raw weights while the average is in
        self._seen = 0  # training batches started
        self._averaged = 0  # training batches whose weights are in the average

    # ------------------------------------------------------------------ helpers
    def _params(self, pl_module) -> list[torch.nn.Parameter]:
        return list(pl_module.model.parameters())

    @property
    def n_averaged(self) -> int:
        """Batches averaged so far (0: the average is not started)."""
        return int(self._average.n_averaged) if self._average is not None else 0

    def averaged_parameters(self) -> dict[str, torch.Tensor]:
        """The averaged parameters by name (as in ``model.named_parameters()``); empty before
        the first averaged batch."""
        if self._average is None or self.n_averaged == 0:
            return {}
        return {n: p.detach().clone() for n, p in self._average.module.named_parameters()}

    def _catch_up(self, pl_module) -> None:
        """Average the weights of the batch that just ended (once per batch)."""
        if self._averaged >= self._seen:
            return
        self._averaged = self._seen
        if self._seen > self.start_batch:
            self._average.update_parameters(pl_module.model)

    def _swap_in(self, pl_module) -> None:
        if self._raw is not None or self.n_averaged == 0:
            return
        params = self._params(pl_module)
        self._raw = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, a in zip(params, self._average.module.parameters(), strict=True):
                p.copy_(a)

    def _swap_out(self, pl_module) -> None:
        if self._raw is None:
            return
        with torch.no_grad():
            for p, r in zip(self._params(pl_module), self._raw, strict=True):
                p.copy_(r)
        self._raw = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self._average is None:
            self._average = AveragedModel(
                pl_module.model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=False
            )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._swap_out(pl_module)
        self._seen += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._catch_up(pl_module)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._swap_in(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._swap_out(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._swap_out(pl_module)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        """Full checkpoints only (Lightning does not call this for weights-only files)."""
        if self._average is None:
            return
        self._catch_up(pl_module)  # a save inside a batch's end hooks, before ours
        if self._raw is not None:  # the average is in the model: store the raw weights
            names = [n for n, _ in pl_module.model.named_parameters()]
            for name, raw in zip(names, self._raw, strict=True):
                checkpoint["state_dict"][f"model.{name}"] = raw.clone()
        checkpoint[CHECKPOINT_KEY] = {
            "params": self.averaged_parameters(),
            "n_averaged": self.n_averaged,
            "batches_seen": self._seen,
            "decay": self.decay,
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(CHECKPOINT_KEY)
        if state is None:
            # resumed from a run without the average: count the batches it trained, so that
            # start_batch still counts from the start of the run
            self._seen = self._averaged = batches_trained(checkpoint)
            log.info(
                "checkpoint has no weight average: %d training batches done, the average starts "
                "after batch %d",
                self._seen,
                max(self._seen, self.start_batch),
            )
            return
        saved_decay = state.get("decay")
        if saved_decay is not None and float(saved_decay) != self.decay:
            log.warning(
                "weight average: the checkpoint's average was kept with decay %g, this run "
                "continues it with decay %g (not an exact resume; give decay=%g to keep it)",
                float(saved_decay),
                self.decay,
                float(saved_decay),
            )
        if self._average is None:
            self.setup(trainer, pl_module, "fit")
        named = dict(self._average.module.named_parameters())
        with torch.no_grad():
            for name, value in state["params"].items():
                named[name].copy_(value)
        self._average.n_averaged.fill_(int(state["n_averaged"]))
        self._seen = self._averaged = int(state["batches_seen"])
