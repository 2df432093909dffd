"""``ForceFieldModule``: a LightningModule with manual optimisation for RLEKF and Adam.

The module ties together a :class:`~rlekf.models.DeepPotential`, an optimizer factory
(``functools.partial`` of a ``torch.optim.Optimizer``) and an updater
(:class:`~rlekf.training.updaters.KalmanUpdater` or
:class:`~rlekf.training.updaters.GradientUpdater`). Logged keys are ``{stage}/{quantity}_{stat}``
with energies in eV/atom, forces in eV/Å; Kalman state under ``kf/``.

Note: every ``optimizer.step`` advances ``trainer.global_step``; a Kalman batch makes
1 + n_select/group_size steps (5 by default). Budget training in epochs; ``kf/updates`` counts
Kalman updates.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor

from rlekf.data import keys as K
from rlekf.models.deep_potential import DeepPotential
from rlekf.optim.distributed import ShardedRLEKF
from rlekf.optim.rlekf import RLEKF
from rlekf.training.metrics import ForceFieldMetrics
from rlekf.training.updaters import GradientUpdater, KalmanUpdater

__all__ = ["ForceFieldModule"]

log = logging.getLogger(__name__)


class ForceFieldModule(L.LightningModule):
    """Train a Deep Potential on energies and forces (and virials when asked).

    Args:
        model: the potential.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer`` (Hydra ``_partial_``).
        updater: a Kalman or gradient updater.
        train_virial: train on virials; ``None`` = when the training data has them and the
            updater weights them (Adam with ``start/limit_pref_v > 0``).
        log_p_every: log per-block trace/min-diag of P every this many batches (RLEKF).
        max_consecutive_skips: stop with an error after this many consecutive skipped
            (non-finite) updates.
    """

    def __init__(
        self,
        model: DeepPotential,
        optimizer: Callable[[Iterable[torch.nn.Parameter]], torch.optim.Optimizer],
        updater: KalmanUpdater | GradientUpdater,
        *,
        train_virial: bool | None = None,
        log_p_every: int = 50,
        max_consecutive_skips: int = 100,
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
        self._last_skipped = 0
        # ModuleDict keys cannot be "train" (nn.Module.train): prefix the stage
        self.metrics = torch.nn.ModuleDict(
            {f"stage_{s}": ForceFieldMetrics(virial=True) for s in ("train", "val", "test")}
        )

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
            self.train_virial = bool(has and getattr(self.updater, "trains_virial", False))
            if isinstance(self.updater, KalmanUpdater) and self.updater.trains_virial:
                # the Kalman updater masks frames without a label itself; validate on virials
                self.train_virial = True
                if not has:
                    log.warning(
                        "train_virial: not every training frame has a virial label; frames "
                        "without one are left out and batches without any skip the virial "
                        "measurement"
                    )

    def configure_optimizers(self):
        """The optimizer; under data parallelism (world size > 1) RLEKF becomes ShardedRLEKF.

        A plain :class:`~rlekf.optim.RLEKF` on several ranks would update each rank's copy of
        the weights with its own data and let the replicas drift apart, so an RLEKF factory
        (``functools.partial(RLEKF, ...)``, what ``optim=rlekf`` gives) is re-targeted to
        :class:`~rlekf.optim.ShardedRLEKF` with the same keywords: ``P`` is sharded across the
        ranks and each Kalman update averages the measurement gradient and error over them.
        """
        factory = self.optimizer_factory
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1 and isinstance(factory, functools.partial) and factory.func is RLEKF:
            factory = functools.partial(ShardedRLEKF, *factory.args, **factory.keywords)
        opt = factory(self.model.parameters())
        if world > 1 and isinstance(opt, RLEKF) and not isinstance(opt, ShardedRLEKF):
            raise TypeError(
                f"{type(opt).__name__} keeps the whole covariance on every rank and would let "
                f"the {world} model replicas diverge; use rlekf.optim.ShardedRLEKF for "
                "multi-process training"
            )
        return opt

    def on_fit_start(self) -> None:
        opt = self._raw_optimizer()
        if isinstance(opt, RLEKF):
            gib = opt.p_bytes / 2**30
            msg = (
                f"RLEKF: {sum(opt.block_sizes)} parameters in {len(opt.block_sizes)} blocks "
                f"{opt.block_sizes}; P holds {opt.p_numel:,} entries = {gib:.3f} GiB "
                f"({opt.p_dtype})"
            )
            if isinstance(opt, ShardedRLEKF) and opt.world_size > 1:
                msg += (
                    f", sharded over {opt.world_size} ranks: rank {opt.rank} holds blocks "
                    f"{list(opt.owned_blocks)} = {opt.p_bytes_local / 2**30:.3f} GiB"
                )
            log.info(msg)
            if isinstance(opt, ShardedRLEKF) and opt.world_size > 1:
                print(msg, flush=True)  # every rank: each holds its own shard
            else:
                self.print(msg)
        if isinstance(self.updater, GradientUpdater):
            self.updater.configure(int(self.trainer.estimated_stepping_batches))

    @property
    def trained_on_virials(self) -> bool:
        """Whether the weights have been fitted to virial labels (saved in checkpoints)."""
        if isinstance(self.updater, KalmanUpdater):
            return self.updater.n_virial_updates > 0
        return bool(self.train_virial and getattr(self.updater, "trains_virial", False))

    def _raw_optimizer(self) -> torch.optim.Optimizer | None:
        if self._trainer is None or not self.trainer.optimizers:
            return None
        return self.trainer.optimizers[0]

    # ------------------------------------------------------------------ steps
    def forward(self, batch: Mapping[str, Tensor], **kwargs) -> dict[str, Tensor]:
        return self.model(batch, **kwargs)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        opt = self.optimizers()
        raw = self._raw_optimizer()
        bs = int(batch[K.N_ATOMS].shape[0])
        if isinstance(self.updater, KalmanUpdater):
            preds = self.updater.update(self.model, batch, opt)
            skipped_now = raw.n_skipped - self._last_skipped
            self._last_skipped = raw.n_skipped
            self._check_skips(skipped_now > 0, f"{skipped_now} Kalman update(s)")
            self.log("kf/lambda", raw.lam, on_step=True, on_epoch=False, batch_size=bs)
            self.log(
                "kf/updates", float(raw.n_updates), on_step=True, on_epoch=False, batch_size=bs
            )
            self.log(
                "kf/skipped", float(raw.n_skipped), on_step=True, on_epoch=False, batch_size=bs
            )
            self.log(
                "kf/indefinite",
                float(raw.n_indefinite),
                on_step=True,
                on_epoch=False,
                batch_size=bs,
            )
            if self.log_p_every and batch_idx % self.log_p_every == 0:
                stats = raw.kalman_stats()  # collective for ShardedRLEKF: all blocks
                for i, (tr, md) in enumerate(zip(stats["trace"], stats["min_diag"], strict=True)):
                    self.log(
                        f"kf/P{i}_trace", float(tr), on_step=True, on_epoch=False, batch_size=bs
                    )
                    self.log(
                        f"kf/P{i}_min_diag", float(md), on_step=True, on_epoch=False, batch_size=bs
                    )
        else:
            preds = self.updater.update(
                self.model, batch, opt, virial=self.train_virial, backward=self.manual_backward
            )
            self._check_skips(bool(preds["skipped"]), "gradient step(s)")
            self.log("train/loss", preds["loss"], on_step=True, on_epoch=True, batch_size=bs)
            self.log("train/lr", self.updater.last_lr, on_step=True, on_epoch=False, batch_size=bs)
        if K.FORCES in preds:
            self.metrics["stage_train"].update(preds, batch)

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
        if self._trainer is not None and self.trainer.training:
            # batches trained in this epoch (`processed`: `completed` lags at batch end)
            done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if 0 < done < self.trainer.num_training_batches:  # saved in the middle of an epoch
                checkpoint["epoch_position"] = (self.trainer.current_epoch, int(done))
                # batches are dealt round-robin to the ranks: done * world_size consumed
                checkpoint["epoch_position_world_size"] = int(self.trainer.world_size)
        checkpoint["rng_states"] = {
            "torch": torch.get_rng_state(),
            "numpy": _numpy_state_to_torch(np.random.get_state()),  # noqa: NPY002 (global state)
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        cfg = checkpoint.get("model_config")
        if cfg is not None and cfg.get("type_map") != self.model.type_map:
            raise ValueError(
                f"checkpoint was trained with type_map {cfg.get('type_map')}, this model has "
                f"{self.model.type_map}"
            )
        if "updater_state" in checkpoint:
            self.updater.load_state_dict(checkpoint["updater_state"])
        # where the run continues: (epoch, batches already trained in it)
        position = checkpoint.get("epoch_position")
        if position is None and "epoch" in checkpoint:
            position = (int(checkpoint["epoch"]) + 1, 0)  # saved at an epoch end
        if position is not None and self._trainer is not None:
            position = _rescale_position(
                position, int(checkpoint.get("epoch_position_world_size", 1)), self.trainer
            )
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
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
