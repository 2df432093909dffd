"""Exact resume: a run stopped after an epoch and resumed equals an uninterrupted run."""

from __future__ import annotations

import hydra
import lightning as L
import pytest
import torch

from tests.helpers.hydra import FAST_DATA, compose_cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


class StopAfter(L.Callback):
    """Simulate an interruption: stop at the end of epoch ``epoch`` (last.ckpt is written)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            trainer.should_stop = True


def _run(tmp_path, data_dir, optim, max_epochs, ckpt_path=None, stop_after=None, extra=()):
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
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_many(cfg.logger, "logger")
    )
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
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
