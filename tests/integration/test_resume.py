"""Exact resume: a run stopped after an epoch and resumed equals an uninterrupted run."""

from __future__ import annotations

import hydra
import lightning as L
import pytest
import torch

from tests.helpers.callbacks import StopAfter
from tests.helpers.hydra import FAST_DATA, compose_cfg


class SimulatedCrash(RuntimeError):
    pass


class StopAtStep(L.Callback):
    """Simulate a crash in the middle of an epoch, right after global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            raise SimulatedCrash(f"crash after step {trainer.global_step}")


def _run(
    tmp_path, data_dir, optim, max_epochs, ckpt_path=None, stop_after=None, extra=(), crash_at=None
):
    overrides = [
        f"optim={optim}",
        "model=small",
        "logger=csv",
        f"trainer.max_epochs={max_epochs}",
        "extras.print_config=false",
        "test=false",
        "trainer.log_every_n_steps=1",
        *FAST_DATA,
        "data.path.n_frames=24",
        "data.n_blocks=6",
        "data.val_fraction=0.17",
        "data.test_fraction=0.17",
        *extra,
    ]
    if optim == "rlekf":
        overrides.append("optim.optimizer.block_size=256")
    cfg = compose_cfg("train", overrides, tmp_path, data_dir)
    L.seed_everything(cfg.seed)
    dm = hydra.utils.instantiate(cfg.data)
    task = hydra.utils.instantiate(cfg.task, model=hydra.utils.instantiate(cfg.model))
    from rlekf.utils.instantiate import instantiate_many

    callbacks = instantiate_many(cfg.callbacks, "callback")
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    if crash_at is not None:
        callbacks.append(StopAtStep(crash_at))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_many(cfg.logger, "logger")
    )
    try:
        trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    except SimulatedCrash:
        assert crash_at is not None
    return trainer, task


def _csv_rows(path):
    import csv

    with open(path) as fh:
        return [r for r in csv.DictReader(fh)]


@pytest.mark.parametrize("optim", ["rlekf", "adam"])
def test_resume_after_epoch_equals_uninterrupted_run(optim, tmp_path, data_dir):
    full_trainer, full = _run(tmp_path / "full", data_dir, optim, 2)
    _run(tmp_path / "first", data_dir, optim, 2, stop_after=0)
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    res_trainer, resumed = _run(tmp_path / "resumed", data_dir, optim, 2, ckpt_path=str(ckpt))
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    opt_a, opt_b = full_trainer.optimizers[0], res_trainer.optimizers[0]
    if optim == "rlekf":
        assert opt_a.lam == opt_b.lam and opt_a.n_updates == opt_b.n_updates
        for pa, pb in zip(opt_a.covariance, opt_b.covariance, strict=True):
            assert pa.dtype == pb.dtype == torch.float64
            assert torch.equal(pa, pb)
        assert torch.equal(
            full.updater.generator.get_state(), resumed.updater.generator.get_state()
        )
    else:
        sa, sb = opt_a.state_dict()["state"], opt_b.state_dict()["state"]
        for k in sa:
            assert torch.equal(sa[k]["exp_avg_sq"], sb[k]["exp_avg_sq"])
        assert full.updater.step_count == resumed.updater.step_count
    # the metrics of the second epoch agree too
    key = "val/force_rmse"
    full_val = [r[key] for r in _csv_rows(tmp_path / "full" / "csv" / "metrics.csv") if r.get(key)]
    res_val = [
        r[key] for r in _csv_rows(tmp_path / "resumed" / "csv" / "metrics.csv") if r.get(key)
    ]
    assert full_val[-1] == res_val[-1]


@pytest.mark.parametrize("optim", ["rlekf", "adam"])
def test_resume_mid_epoch_equals_uninterrupted_run(optim, tmp_path, data_dir):
    # 16 training frames, batch 2 -> 8 batches per epoch; RLEKF makes 5 steps per batch
    every = 15 if optim == "rlekf" else 3
    crash = 55 if optim == "rlekf" else 11  # in the middle of the second epoch
    extra = [f"callbacks.last_checkpoint.every_n_steps={every}"]
    full_trainer, full = _run(tmp_path / "full", data_dir, optim, 2, extra=extra)
    crashed, _ = _run(tmp_path / "crash", data_dir, optim, 2, extra=extra, crash_at=crash)
    ckpt = tmp_path / "crash" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 1 and 0 < saved["epoch_position"][1] < 8
    res_trainer, resumed = _run(
        tmp_path / "res", data_dir, optim, 2, ckpt_path=str(ckpt), extra=extra
    )
    assert res_trainer.global_step == full_trainer.global_step
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_same_seed_same_results(tmp_path, data_dir):
    _, a = _run(tmp_path / "a", data_dir, "rlekf", 1)
    _, b = _run(tmp_path / "b", data_dir, "rlekf", 1)
    for (name, x), (_, y) in zip(
        a.model.state_dict().items(), b.model.state_dict().items(), strict=True
    ):
        assert torch.equal(x, y), name


@pytest.mark.slow
def test_soak_thousands_of_updates_with_resume_cycles(tmp_path, data_dir):
    """~2,000 RLEKF updates (float32 model, float64 P), stopped and resumed every 3 epochs."""
    extra = [
        "model.dtype=float32",
        "data.path.n_frames=48",
        "data.n_blocks=8",
        "data.val_fraction=0.125",
        "data.test_fraction=0.125",
        "data.batch_size=1",
    ]
    epochs = 12
    full_trainer, full = _run(tmp_path / "full", data_dir, "rlekf", epochs, extra=extra)
    ckpt = None
    for k, stop in enumerate(range(2, epochs, 3)):
        trainer, _ = _run(
            tmp_path / f"part{k}",
            data_dir,
            "rlekf",
            epochs,
            ckpt_path=ckpt,
            stop_after=stop,
            extra=extra,
        )
        ckpt = str(tmp_path / f"part{k}" / "checkpoints" / "last.ckpt")
    res_trainer, resumed = _run(
        tmp_path / "last", data_dir, "rlekf", epochs, ckpt_path=ckpt, extra=extra
    )
    opt = full_trainer.optimizers[0]
    assert opt.n_updates >= 2000 and opt.n_skipped == 0
    for (name, a), (_, b) in zip(
        full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    for pa, pb in zip(opt.covariance, res_trainer.optimizers[0].covariance, strict=True):
        assert torch.equal(pa, pb)
        assert torch.all(torch.diagonal(pa) > 0)
        assert torch.allclose(pa, pa.T, rtol=0, atol=1e-6 * float(pa.abs().max()))
    assert float(full_trainer.callback_metrics["val/force_rmse"]) < 0.5
