"""Callbacks: a one-line summary per epoch (wall-clock, metrics, Kalman state), training-time
accounting, the resume checkpoint, the Kalman monitor (``kf/*``), the resume state (epoch
position and RNG states in checkpoints) and a per-step profile timer."""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from rlekf import keys as K
from rlekf.optim.distributed import ShardedRLEKF
from rlekf.optim.rlekf import RLEKF

__all__ = [
    "EpochSummary",
    "KalmanMonitor",
    "LastCheckpoint",
    "ResumeState",
    "StepSizeLog",
    "StepTimer",
]

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
    * ``time/optimizer_steps``: optimizer steps done (Lightning's ``global_step``: Kalman
      updates in paper mode, batches in fused mode and for Adam; the CSV ``step`` column
      counts batches).

    Args:
        initial_point: also log the validation metrics of the model before training (the
            untrained model; with ``ckpt_init`` the loaded one), at step 0 with ``time/epochs``
            = ``time/train_s`` = ``time/optimizer_steps`` = 0, from Lightning's sanity check
            over the whole validation set (needs ``trainer.num_sanity_val_steps=-1``; a resumed
            run runs no sanity check and logs none). This is the reference of "updates until
            the force RMSE halves" (:func:`rlekf.runs.dead_time`).
        max_train_s: stop the fit once ``time/train_s`` reaches this many seconds (checked
            after every training batch, like Lightning's ``max_time`` for the wall-clock; the
            epoch cut there counts as the fraction it ran, and Lightning validates once more
            on stopping, outside the clock). A budget on training time gives
            optimizers whose validation costs differently the same training time. None: no
            such limit. Needs ``trainer.min_epochs=0`` to bind inside the first epoch.
    """

    def __init__(self, initial_point: bool = False, max_train_s: float | None = None) -> None:
        if max_train_s is not None and not max_train_s > 0:
            raise ValueError(f"max_train_s must be > 0 seconds or None, got {max_train_s}")
        self.initial_point = bool(initial_point)
        self.max_train_s = None if max_train_s is None else float(max_train_s)
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

    def val_time(self, now: float) -> float:
        """Validation seconds up to ``now`` (a ``time.perf_counter()`` value; the running
        validation included)."""
        return self.val_s + (now - self._val_since if self._val_since else 0.0)

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

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        if not self.initial_point or trainer.global_step != 0:
            return
        if trainer.num_sanity_val_steps != float("inf"):  # -1 becomes inf in Lightning
            log.warning(
                "EpochSummary(initial_point=True) needs the sanity check to cover the whole "
                "validation set (trainer.num_sanity_val_steps=-1; it is %s): no step-0 point "
                "logged",
                trainer.num_sanity_val_steps,
            )
            return
        values = getattr(pl_module, "last_eval_metrics", {}).get("val")
        if not values:
            return
        now = time.perf_counter()
        row = {f"val/{k}": v for k, v in values.items()}
        row.update(
            {
                "epoch": 0,
                "time/elapsed_s": now - self.t0 if self.t0 is not None else 0.0,
                "time/train_s": 0.0,
                "time/val_s": self.val_time(now),
                "time/epochs": 0.0,
                "time/optimizer_steps": 0.0,
            }
        )
        for lg in trainer.loggers:
            lg.log_metrics(row, step=0)
            lg.save()
        rank_zero_info(
            "initial validation (before training): %s",
            ", ".join(f"{k}={v:.4g}" for k, v in row.items() if k.startswith("val/")),
        )

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
        if self.max_train_s is None or trainer.should_stop:
            return
        # every rank takes rank 0's decision (the ranks' clocks differ a little)
        stop = trainer.strategy.broadcast(self.train_time() >= self.max_train_s)
        if stop:
            trainer.should_stop = True
            rank_zero_info(
                "training time budget reached (%.1f s >= max_train_s %.1f s): stopping",
                self.train_time(),
                self.max_train_s,
            )

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
            ("time/val_s", self.val_time(now)),
            ("time/epochs", self.epochs_done(trainer)),
            ("time/optimizer_steps", float(trainer.global_step)),
        ):
            pl_module.log(key, value, on_step=False, on_epoch=True)

    @rank_zero_only
    def _summary(self, trainer) -> None:
        if trainer.sanity_checking or self.t0 is None:
            return
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch}", f"{time.perf_counter() - self.t0:.1f} s"]
        for key in ("val/energy_rmse", "val/force_rmse", "val/virial_rmse", "val/score"):
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


def _kalman_optimizer(trainer) -> RLEKF | None:
    opt = trainer.optimizers[0] if trainer.optimizers else None
    return opt if isinstance(opt, RLEKF) else None


class StepSizeLog(L.Callback):
    """Per-batch diagnostics in a CSV: how far each training batch moves the weights.

    One row per training batch: ``epoch``, ``step`` (global), ``n_atoms`` (of the batch's
    frames), ``energy_error`` (mean |E_label - E_pred| / n before the batch's update, eV/atom,
    from one extra forward pass), ``step_norm`` (‖Δw‖₂ over all parameters of the whole
    batch's update), ``max_step`` (max |Δw|), for a Kalman optimizer ``innovation`` (its
    ``last_innovation``, else NaN), ``energy_bias`` (mean (E_pred - E_label) / n before the
    update, signed, eV/atom) and ``energy_change`` (mean change of E_pred / n of the batch's
    frames made by the update, eV/atom, from a second extra forward pass). Written by rank 0
    to ``<log dir>/<filename>`` (the trainer's ``default_root_dir`` without a logger); rows are
    flushed every batch.

    Args:
        filename: CSV name, relative to the log folder.
    """

    COLUMNS = (
        "epoch",
        "step",
        "n_atoms",
        "energy_error",
        "step_norm",
        "max_step",
        "innovation",
        "energy_bias",
        "energy_change",
    )

    def __init__(self, filename: str = "step_sizes.csv") -> None:
        self.filename = filename
        self._file = None
        self._before: torch.Tensor | None = None
        self._error = float("nan")
        self._bias = float("nan")
        self._e_before: torch.Tensor | None = None

    def _weights(self, pl_module) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1).double() for p in pl_module.model.parameters()])

    @rank_zero_only
    def on_train_start(self, trainer, pl_module) -> None:
        folder = trainer.log_dir or trainer.default_root_dir
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, self.filename)
        new = not os.path.exists(path)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed at train end)
        if new:
            self._file.write(",".join(self.COLUMNS) + "\n")

    @rank_zero_only
    def on_train_end(self, trainer, pl_module) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.on_train_end(trainer, pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._file is None:
            return
        self._before = self._weights(pl_module)
        with torch.no_grad():
            e_pred = pl_module.model(batch, forces=False)[K.ENERGY].double()
        n = batch[K.N_ATOMS].to(torch.float64)
        self._e_before = e_pred / n
        err = self._e_before - batch[K.ENERGY].double() / n  # per atom, signed
        self._error = float(torch.mean(torch.abs(err)))
        self._bias = float(torch.mean(err))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._file is None or self._before is None:
            return
        dw = self._weights(pl_module) - self._before
        opt = _kalman_optimizer(trainer)
        innovation = opt.last_innovation if opt is not None else float("nan")
        with torch.no_grad():
            e_after = pl_module.model(batch, forces=False)[K.ENERGY].double()
        n = batch[K.N_ATOMS].to(torch.float64)
        change = float(torch.mean(e_after / n - self._e_before))
        row = (
            trainer.current_epoch,
            trainer.global_step,
            int(batch[K.N_ATOMS][0]),
            self._error,
            float(torch.linalg.vector_norm(dw)),
            float(dw.abs().max()),
            innovation,
            self._bias,
            change,
        )
        self._file.write(",".join(repr(v) if isinstance(v, float) else str(v) for v in row))
        self._file.write("\n")
        self._file.flush()
        self._before = None


class KalmanMonitor(L.Callback):
    """Log the Kalman filter's state after every training batch (a no-op for other optimizers).

    Logged per step (``kf/``): ``lambda`` (forgetting factor), ``updates``, ``skipped``
    (non-finite errors/innovations, left out) and ``indefinite`` (innovations that were not
    positive definite) counted since the start of training, and every ``log_p_every`` batches
    ``P{i}_trace`` / ``P{i}_min_diag`` of each block ``i`` of ``P`` (a collective for
    :class:`~rlekf.optim.ShardedRLEKF`: every rank must log). At the start of a fit it prints the
    blocks and the memory of ``P``. :class:`~rlekf.training.ForceFieldModule` adds it itself.

    Args:
        log_p_every: batches between the per-block ``P`` statistics (0: never).
    """

    def __init__(self, log_p_every: int = 50) -> None:
        self.log_p_every = int(log_p_every)

    def on_fit_start(self, trainer, pl_module) -> None:
        opt = _kalman_optimizer(trainer)
        if opt is None:
            return
        gib = opt.p_bytes / 2**30
        msg = (
            f"RLEKF: {sum(opt.block_sizes)} parameters in {len(opt.block_sizes)} blocks "
            f"{opt.block_sizes}; P holds {opt.p_numel:,} entries = {gib:.3f} GiB "
            f"({opt.p_dtype})"
        )
        sharded = isinstance(opt, ShardedRLEKF) and opt.world_size > 1
        if sharded:
            msg += (
                f", sharded over {opt.world_size} ranks: rank {opt.rank} holds blocks "
                f"{list(opt.owned_blocks)} = {opt.p_bytes_local / 2**30:.3f} GiB"
            )
        log.info(msg)
        if sharded:
            print(msg, flush=True)  # every rank: each holds its own shard
        else:
            pl_module.print(msg)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        opt = _kalman_optimizer(trainer)
        if opt is None:
            return
        bs = int(batch[K.N_ATOMS].shape[0])

        def put(name: str, value: float) -> None:
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=bs)

        put("kf/lambda", opt.lam)
        put("kf/updates", float(opt.n_updates))
        put("kf/skipped", float(opt.n_skipped))
        put("kf/indefinite", float(opt.n_indefinite))
        if self.log_p_every and batch_idx % self.log_p_every == 0:
            stats = opt.kalman_stats()  # collective for ShardedRLEKF: all blocks
            for i, (tr, md) in enumerate(zip(stats["trace"], stats["min_diag"], strict=True)):
                put(f"kf/P{i}_trace", float(tr))
                put(f"kf/P{i}_min_diag", float(md))


class ResumeState(L.Callback):
    """Where a run stands in its epoch and the global RNG states, in every checkpoint.

    Writes (top-level checkpoint keys, as every earlier version did):

    * ``epoch_position``: ``(epoch, batches trained in it)`` when saved in the middle of an
      epoch, with ``epoch_position_world_size`` (the number of ranks then);
    * ``rng_states``: the torch, NumPy (legacy global) and Python RNG states.

    On resume it hands the position to the data module (``resume_position``: its sampler skips
    the batches trained already, rescaled to the new number of ranks; a checkpoint saved at an
    epoch end continues with the next epoch) and restores the RNG states, so a resumed run
    repeats the uninterrupted one exactly. :class:`~rlekf.training.ForceFieldModule` adds it
    itself.
    """

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.training:
            # batches trained in this epoch (`processed`: `completed` lags at batch end)
            done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if 0 < done < trainer.num_training_batches:  # saved in the middle of an epoch
                checkpoint["epoch_position"] = (trainer.current_epoch, int(done))
                # batches are dealt round-robin to the ranks: done * world_size consumed
                checkpoint["epoch_position_world_size"] = int(trainer.world_size)
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_torch(np.random.get_state()),  # noqa: NPY002 (global state)
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        # where the run continues: (epoch, batches already trained in it)
        position = checkpoint.get("epoch_position")
        if position is None and "epoch" in checkpoint:
            position = (int(checkpoint["epoch"]) + 1, 0)  # saved at an epoch end
        if position is not None:
            position = _rescale_position(
                position, int(checkpoint.get("epoch_position_world_size", 1)), trainer
            )
        dm = getattr(trainer, "datamodule", None)
        if position is not None and dm is not None and hasattr(dm, "resume_position"):
            dm.resume_position = tuple(position)  # the sampler continues from there
        rng = checkpoint.get("rng_states")
        if rng is not None:
            torch.set_rng_state(rng["torch"])
            np.random.set_state(_numpy_state_from_torch(rng["numpy"]))  # noqa: NPY002
            random.setstate(rng["python"])


def _rescale_position(position: tuple[int, int], saved_world: int, trainer) -> tuple[int, int]:
    """Batches already trained per rank, for a run resumed on a different number of ranks.

    The grouped sampler deals the epoch's batch order round-robin, so ``done`` batches per rank
    on ``saved_world`` ranks are the first ``done * saved_world`` batches of that order; on
    ``world`` ranks each skips ``done * saved_world / world`` of its own. When that does not
    divide, the few batches of the remainder are trained again (with a warning).
    """
    epoch, done = position
    world = int(trainer.world_size)
    if done == 0 or world == saved_world:
        return epoch, done
    consumed = done * saved_world
    if consumed % world:
        log.warning(
            "resuming a mid-epoch checkpoint of %d rank(s) on %d: %d batch(es) of epoch %d "
            "are trained twice",
            saved_world,
            world,
            consumed % world,
            epoch,
        )
    return epoch, consumed // world


def _numpy_state_to_torch(state: tuple) -> dict[str, Any]:
    """NumPy's legacy RNG state with the key array as a tensor (``weights_only`` loadable)."""
    name, keys, pos, has_gauss, cached = state
    return {
        "name": name,
        "keys": torch.from_numpy(keys.astype(np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached": float(cached),
    }


def _numpy_state_from_torch(state: dict[str, Any]) -> tuple:
    keys = state["keys"].numpy().astype(np.uint32)
    return (state["name"], keys, state["pos"], state["has_gauss"], state["cached"])
