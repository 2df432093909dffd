"""``ForceFieldModule``: a LightningModule with manual optimisation for RLEKF and Adam.

The module ties together a :class:`~rlekf.models.DeepPotential`, an optimizer factory
(``functools.partial`` of a ``torch.optim.Optimizer``; ``optim=rlekf`` names
:func:`~rlekf.training.optimizers.kalman_filter`, which gives ``ShardedRLEKF`` under data
parallelism) and an :class:`~rlekf.training.updaters.Updater`
(:class:`~rlekf.training.updaters.KalmanUpdater` or
:class:`~rlekf.training.updaters.GradientUpdater`). Logged keys are ``{stage}/{quantity}_{stat}``
with energies in eV/atom, forces in eV/Å; the Kalman state under ``kf/``
(:class:`~rlekf.training.callbacks.KalmanMonitor`); the epoch position and RNG states of exact
resume are :class:`~rlekf.training.callbacks.ResumeState`'s. The module adds both callbacks.

Note: every ``optimizer.step`` advances ``trainer.global_step``; a Kalman batch makes
1 + n_select/group_size steps (5 by default). Budget training in epochs; ``kf/updates`` counts
Kalman updates.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from rlekf import keys as K
from rlekf.models.deep_potential import DeepPotential
from rlekf.optim.distributed import ShardedRLEKF
from rlekf.optim.rlekf import RLEKF
from rlekf.training.callbacks import KalmanMonitor, ResumeState
from rlekf.training.metrics import ForceFieldMetrics, check_score_scales, selection_score
from rlekf.training.updaters import Updater

__all__ = ["ForceFieldModule"]

log = logging.getLogger(__name__)


class ForceFieldModule(L.LightningModule):
    """Train a Deep Potential on energies and forces (and virials when asked).

    Args:
        model: the potential.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (Hydra ``_partial_``).
        updater: a Kalman or gradient updater (:class:`~rlekf.training.updaters.Updater`).
        train_virial: train on virials; ``None`` = when the training data has them and the
            updater weights them (Adam with ``start/limit_pref_v > 0``).
        log_p_every: log per-block trace/min-diag of P every this many batches (RLEKF; passed
            to :class:`~rlekf.training.callbacks.KalmanMonitor`).
        max_consecutive_skips: stop with an error after this many consecutive skipped
            (non-finite) updates.
        score_scales: when given (e.g. ``{"energy_rmse": 2.21e-3, "force_rmse": 0.06}``, eV/atom
            and eV/Å), validation and test also log ``{stage}/score``, the sum of those metrics
            each divided by its scale (:func:`~rlekf.training.metrics.selection_score`); with
            ``monitor=val/score`` the best checkpoint weighs energies and forces together. A
            fit refuses ``virial_rmse`` among them when it does not validate on virials, and a
            validation that lacks a scaled metric stops with an error (never a nan score).
    """

    def __init__(
        self,
        model: DeepPotential,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        updater: Updater,
        *,
        train_virial: bool | None = None,
        log_p_every: int = 50,
        max_consecutive_skips: int = 100,
        score_scales: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.optimizer_factory = optimizer
        self.updater = updater
        self.train_virial_arg = train_virial
        self.train_virial = bool(train_virial)
        self.log_p_every = int(log_p_every)
        self.max_consecutive_skips = int(max_consecutive_skips)
        self._consecutive_skips = 0
        self.score_scales = check_score_scales(score_scales) if score_scales is not None else None
        # ModuleDict keys cannot be "train" (nn.Module.train): prefix the stage
        self.metrics = torch.nn.ModuleDict(
            {f"stage_{s}": ForceFieldMetrics(virial=True) for s in ("train", "val", "test")}
        )
        # the last computed metrics per stage ("val": {"force_rmse": eV/Å, ...})
        self.last_eval_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or not hasattr(dm, "stats"):
            return
        if stage == "fit" and not bool(self.model.stats_fitted):
            stats = dm.stats()
            self.model.set_statistics(stats)
            log.info(
                "statistics from the training set: energy bias %s eV/atom; max neighbours %s "
                "(sel %s)",
                dict(
                    zip(self.model.type_map, stats["energy_bias"].round(4).tolist(), strict=True)
                ),
                stats["max_neighbors"].tolist(),
                self.model.sel,
            )
        if self.train_virial_arg is None:
            has = dm.datasets["train"].has_virial if dm.datasets else False
            self.train_virial = bool(has and self.updater.trains_virial)
            if self.updater.masks_virial_labels and self.updater.trains_virial:
                # the updater masks frames without a label itself (Kalman): validate on virials
                self.train_virial = True
                if not has:
                    log.warning(
                        "train_virial: not every training frame has a virial label; frames "
                        "without one are left out and batches without any skip the virial "
                        "measurement"
                    )

    def configure_optimizers(self):
        """The optimizer, ``optimizer(model.parameters())``.

        Under data parallelism the optimizer must keep the replicas equal: ``optim=rlekf``
        gives :class:`~rlekf.optim.ShardedRLEKF` there
        (:func:`~rlekf.training.optimizers.kalman_filter`); a plain
        :class:`~rlekf.optim.RLEKF` on several ranks is refused.
        """
        opt = self.optimizer_factory(self.model.parameters())
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and isinstance(opt, RLEKF) and not isinstance(opt, ShardedRLEKF):
            raise TypeError(
                f"{type(opt).__name__} keeps the whole covariance on every rank and would let "
                f"the {world} model replicas diverge; use rlekf.optim.ShardedRLEKF for "
                "multi-process training (optim=rlekf chooses it: "
                "rlekf.training.optimizers.kalman_filter)"
            )
        return opt

    def configure_callbacks(self) -> list[L.Callback]:
        """The Kalman monitor (``kf/*``) and the resume state (epoch position, RNG states)."""
        return [KalmanMonitor(self.log_p_every), ResumeState()]

    def on_fit_start(self) -> None:
        if self.score_scales and "virial_rmse" in self.score_scales and not self.train_virial:
            raise ValueError(
                "score_scales names virial_rmse, but this fit does not validate on virials "
                "(train_virial is off or the data has no virial labels); drop it from "
                "task.score_scales"
            )
        self.updater.on_fit_start(lambda: int(self.trainer.estimated_stepping_batches))

    @property
    def trained_on_virials(self) -> bool:
        """Whether the weights have been fitted to virial labels (saved in checkpoints)."""
        return bool(self.updater.trained_on_virials(self.train_virial))

    def _raw_optimizer(self) -> torch.optim.Optimizer | None:
        if self._trainer is None or not self.trainer.optimizers:
            return None
        return self.trainer.optimizers[0]

    # ------------------------------------------------------------------ steps
    def forward(self, batch: Mapping[str, Tensor], **kwargs) -> dict[str, Tensor]:
        return self.model(batch, **kwargs)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        bs = int(batch[K.N_ATOMS].shape[0])
        result = self.updater.update(
            self.model,
            batch,
            self.optimizers(),
            virial=self.train_virial,
            backward=self.manual_backward,
        )
        self._check_skips(result.skipped > 0, f"{result.skipped} {self.updater.skip_noun}")
        for name, value in result.epoch_logs.items():
            self.log(name, value, on_step=True, on_epoch=True, batch_size=bs)
        for name, value in result.logs.items():
            self.log(name, value, on_step=True, on_epoch=False, batch_size=bs)
        # energy-only batches (no force measurement: energy warm start, train_force=false)
        # count in the energy metrics; the force metrics skip them
        self.metrics["stage_train"].update(result.predictions, batch)

    def _check_skips(self, skipped: bool, what: str) -> None:
        self._consecutive_skips = self._consecutive_skips + 1 if skipped else 0
        if skipped:
            log.warning("skipped %s with non-finite error/gradient/innovation", what)
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(
                f"{self._consecutive_skips} consecutive batches had non-finite errors or "
                "gradients; the weights and P were left untouched, but training cannot "
                "progress: check the data for NaN/inf labels or lower the prefactors"
            )

    def _eval_step(self, stage: str, batch: Mapping[str, Tensor]) -> None:
        virial = self.train_virial and bool(batch[K.HAS_VIRIAL].any())
        with torch.enable_grad():
            preds = self.model(batch, forces=True, virial=virial)
        self.metrics[f"stage_{stage}"].update({k: v.detach() for k, v in preds.items()}, batch)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _log_stage(self, stage: str) -> None:
        values = self.metrics[f"stage_{stage}"].compute()
        values = {name: float(v) for name, v in values.items()}
        if self.score_scales is not None and stage != "train":
            missing = sorted(set(self.score_scales) - set(values))
            if not missing:
                values["score"] = selection_score(values, self.score_scales)
            elif stage == "val" and not self.trainer.sanity_checking:
                raise ValueError(
                    f"score_scales names {missing}, which validation did not compute "
                    f"(computed: {sorted(values)})"
                )
        # kept for callbacks (the sanity check's values never reach the loggers otherwise)
        self.last_eval_metrics[stage] = dict(values)
        for name, value in values.items():
            self.log(
                f"{stage}/{name}",
                float(value),
                prog_bar=name in ("energy_rmse", "force_rmse") and stage != "train",
                sync_dist=True,
            )
        self.metrics[f"stage_{stage}"].reset()

    def on_train_epoch_end(self) -> None:
        self._log_stage("train")

    def on_validation_epoch_end(self) -> None:
        self._log_stage("val")

    def on_test_epoch_end(self) -> None:
        self._log_stage("test")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        opt = self._raw_optimizer()
        if (
            isinstance(opt, ShardedRLEKF)
            and opt.world_size > 1
            and "optimizer_states" in checkpoint
        ):
            # Lightning calls this on every rank and writes rank 0's dict: gather all P
            # blocks there (collective), so the file holds the whole covariance and resumes
            # on any number of ranks (each keeps its own blocks) or on one process
            full = opt.gather_state_dict(dst=0)
            if full is not None:
                checkpoint["optimizer_states"] = [full]
        checkpoint["model_config"] = dict(self.model.config)
        checkpoint["updater_state"] = self.updater.state_dict()
        checkpoint["trained_on_virials"] = self.trained_on_virials
        # the epoch position and RNG states: ResumeState

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cfg = checkpoint.get("model_config")
        if cfg is not None and cfg.get("type_map") != self.model.type_map:
            raise ValueError(
                f"checkpoint was trained with type_map {cfg.get('type_map')}, this model has "
                f"{self.model.type_map}"
            )
        if "updater_state" in checkpoint:
            self.updater.load_state_dict(checkpoint["updater_state"])
        # the epoch position and RNG states: ResumeState
