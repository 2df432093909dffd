"""Callbacks: a one-line summary per epoch (wall-clock, metrics, Kalman state), training-time
accounting, the resume checkpoint, and a per-step profile timer."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

from rlekf import keys as K

__all__ = ["EpochSummary", "LastCheckpoint", "StepTimer"]

log = logging.getLogger(__name__)


class EpochSummary(L.Callback):
    """Print ``epoch, wall-clock, val energy/force RMSE[, λ, Kalman updates]`` after validation,
    and log the run's clocks beside the validation metrics.

    Energies in eV/atom, forces in eV/Å. Readable in log files, unlike a progress bar.

    Logged at every validation (seconds since the start of this fit; a resumed run restarts
    them):

    * ``time/elapsed_s``: wall-clock, everything included (validation, checkpoint writes).
    * ``time/train_s``: training time only — the clock runs from the start of each training
      epoch to its last batch and stops during validation and while a checkpoint is written
      (``trainer.save_checkpoint``: Lightning's ``ModelCheckpoint`` and
      :class:`LastCheckpoint`), so optimizers whose validation or checkpoints cost
      differently are compared on their training alone.
    * ``time/val_s``: time spent validating (sanity check included).
    * ``time/epochs``: training epochs done, fractional when the run stopped inside an epoch
      (e.g. ``max_time``): ``epoch + batches done / batches per epoch``.
    """

    def __init__(self) -> None:
        self.t0: float | None = None
        self.train_s = 0.0
        self.val_s = 0.0
        self._run_since: float | None = None  # the training clock runs since then
        self._val_since: float | None = None
        self._batches = 0  # training batches done in the current epoch
        self._orig_save: Callable[..., Any] | None = None

    # --------------------------------------------------------- the training clock
    def _start(self) -> None:
        if self._run_since is None:
            self._run_since = time.perf_counter()

    def _stop(self) -> None:
        if self._run_since is not None:
            self.train_s += time.perf_counter() - self._run_since
            self._run_since = None

    def train_time(self) -> float:
        """Training seconds so far (the running interval included)."""
        running = time.perf_counter() - self._run_since if self._run_since is not None else 0.0
        return self.train_s + running

    def on_fit_start(self, trainer, pl_module) -> None:
        self.t0 = time.perf_counter()
        self.train_s = self.val_s = 0.0
        self._run_since = self._val_since = None
        if self._orig_save is None:  # checkpoint writes stop the training clock
            self._orig_save = trainer.save_checkpoint
            orig = self._orig_save

            @functools.wraps(orig)
            def save_checkpoint(*args, **kwargs):
                running = self._run_since is not None
                self._stop()
                try:
                    return orig(*args, **kwargs)
                finally:
                    if running:
                        self._start()

            trainer.save_checkpoint = save_checkpoint

    def on_fit_end(self, trainer, pl_module) -> None:
        self._stop()
        if self._orig_save is not None:
            trainer.save_checkpoint = self._orig_save
            self._orig_save = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_fit_end(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._batches = 0
        self._start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop()

    def on_validation_start(self, trainer, pl_module) -> None:
        self._stop()
        self._val_since = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._val_since is not None:
            self.val_s += time.perf_counter() - self._val_since
            self._val_since = None
        n = trainer.num_training_batches
        if (
            trainer.state.fn == TrainerFn.FITTING
            and not trainer.sanity_checking
            and not trainer.should_stop
            and isinstance(n, int)
            and 0 < self._batches < n
        ):
            self._start()  # validation inside an epoch (val_check_interval < 1)
        self._summary(trainer)

    def epochs_done(self, trainer) -> float:
        """Training epochs done: ``current_epoch`` plus the fraction of this one."""
        n = trainer.num_training_batches
        frac = self._batches / n if isinstance(n, int) and n > 0 else 0.0
        return trainer.current_epoch + min(frac, 1.0)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.t0 is None:
            return
        # clocks in the same row as the validation metrics (rlekf-report, rlekf-bench)
        now = time.perf_counter()
        for key, value in (
            ("time/elapsed_s", now - self.t0),
            ("time/train_s", self.train_time()),
            ("time/val_s", self.val_s + (now - self._val_since if self._val_since else 0.0)),
            ("time/epochs", self.epochs_done(trainer)),
        ):
            pl_module.log(key, value, on_step=False, on_epoch=True)

    @rank_zero_only
    def _summary(self, trainer) -> None:
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
        keep: keep the file after a fit that ended normally; ``False`` deletes it then (a
            finished sweep run keeps only its small weights-only checkpoint; a run that
            crashed or was stopped keeps ``last.ckpt`` to resume from).
    """

    def __init__(
        self,
        dirpath: str,
        every_n_steps: int = 500,
        filename: str = "last.ckpt",
        keep: bool = True,
    ):
        if every_n_steps < 0:
            raise ValueError(f"every_n_steps must be >= 0, got {every_n_steps}")
        self.dirpath = dirpath
        self.every_n_steps = int(every_n_steps)
        self.filename = filename
        self.keep = bool(keep)
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

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.keep and trainer.is_global_zero and os.path.exists(self.path):
            os.remove(self.path)


class StepTimer(L.Callback):
    """Where the time of training steps goes: optimizer updates, model forward passes, the
    rest of each step, and the time between steps (data loading, loop and callbacks).

    Non-invasive: it wraps the public ``step``/``step_k`` of each optimizer *instance* and
    registers forward hooks on ``pl_module.model`` (the whole ``pl_module`` when it has no
    ``model``) for the duration of the fit, and restores them at its end. A call nested in a
    timed call (e.g. ``step`` calling ``step_k``) is counted once. On CUDA every timestamp
    synchronizes the device first.

    The first ``warmup`` training batches are run but not counted; the timed window runs from
    the end of the last warm-up batch (the start of the epoch when ``warmup == 0``) to the end
    of the last batch, so ``step_s + between_s == window_s`` for a single epoch.

    Attributes (seconds, over the timed batches):
        batches / frames: timed batches and the frames they held (``len(batch["n_atoms"])``
            or 1 per batch for other batch types).
        step_s: inside ``training_step`` (``on_train_batch_start`` to ``on_train_batch_end``).
        optimizer_s / optimizer_calls: inside the optimizers' ``step``/``step_k``.
        forward_s / forward_calls: inside the model's forward (for force fields this includes
            the force derivative computed in the forward pass).
        between_s: between the end of one step and the start of the next (data loading).
        window_s: wall-clock of the timed window, from its own clock.
    """

    def __init__(self, warmup: int = 0) -> None:
        if warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {warmup}")
        self.warmup = int(warmup)
        self._reset()
        self._patched: list[tuple[Any, str, Any]] = []
        self._hooks: list[Any] = []
        self._cuda = False

    def _reset(self) -> None:
        self.batches = self.frames = 0
        self.optimizer_calls = self.forward_calls = 0
        self.step_s = self.optimizer_s = self.forward_s = self.between_s = 0.0
        self.window_s = 0.0
        self._seen = 0
        self._depth = 0
        self._fwd_depth = 0
        self._fwd_t: float | None = None
        self._window_t0: float | None = None
        self._last_end: float | None = None
        self._batch_t: float | None = None
        self._counting = False

    def _now(self) -> float:
        if self._cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if self._depth or not self._counting:
                self._depth += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._depth -= 1
            self._depth += 1
            t0 = self._now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.optimizer_s += self._now() - t0
                self.optimizer_calls += 1
                self._depth -= 1

        return wrapper

    def _fwd_pre(self, module, args) -> None:
        self._fwd_depth += 1
        if self._fwd_depth == 1 and self._counting:
            self._fwd_t = self._now()

    def _fwd_post(self, module, args, output) -> None:
        self._fwd_depth -= 1
        if self._fwd_depth == 0 and self._fwd_t is not None:
            self.forward_s += self._now() - self._fwd_t
            self.forward_calls += 1
            self._fwd_t = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._reset()
        self._cuda = pl_module.device.type == "cuda"
        for opt in trainer.optimizers:
            for name in ("step", "step_k"):
                fn = getattr(opt, name, None)
                if callable(fn):
                    self._patched.append((opt, name, vars(opt).get(name)))
                    setattr(opt, name, self._timed(fn))
        model = getattr(pl_module, "model", None)
        target = model if isinstance(model, torch.nn.Module) else pl_module
        self._hooks = [
            target.register_forward_pre_hook(self._fwd_pre),
            target.register_forward_hook(self._fwd_post),
        ]

    def on_train_end(self, trainer, pl_module) -> None:
        for opt, name, own in self._patched:
            if own is None:
                vars(opt).pop(name, None)  # the class's method again
            else:
                setattr(opt, name, own)
        self._patched = []
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if self._seen >= self.warmup and self._window_t0 is None:
            self._window_t0 = self._last_end = self._now()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        t = self._now()
        self._counting = self._seen >= self.warmup
        if self._counting and self._last_end is not None:
            self.between_s += t - self._last_end
        self._batch_t = t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        t = self._now()
        if self._counting and self._batch_t is not None:
            self.step_s += t - self._batch_t
            self.batches += 1
            n = batch.get(K.N_ATOMS) if isinstance(batch, dict) else None
            self.frames += int(len(n)) if n is not None else 1
            self.window_s = t - self._window_t0 if self._window_t0 is not None else 0.0
        self._seen += 1
        self._counting = False
        if self._seen >= self.warmup:
            if self._window_t0 is None:
                self._window_t0 = t
            self._last_end = t

    def summary(self) -> dict[str, float]:
        """Seconds per part over the timed batches, with ``total_s = step_s + between_s``."""
        return {
            "batches": self.batches,
            "frames": self.frames,
            "total_s": self.step_s + self.between_s,
            "window_s": self.window_s,
            "step_s": self.step_s,
            "optimizer_s": self.optimizer_s,
            "optimizer_calls": self.optimizer_calls,
            "forward_s": self.forward_s,
            "forward_calls": self.forward_calls,
            "rest_of_step_s": self.step_s - self.optimizer_s - self.forward_s,
            "between_s": self.between_s,
        }
