"""End-to-end training through the real Hydra configs (CPU, small settings)."""

from __future__ import annotations

import pytest
import torch

from rlekf.train import train
from tests.helpers.hydra import FAST_DATA, PAPER_LEVEL, compose_cfg, fit_from_cfg


@pytest.mark.parametrize("optim", ["rlekf", "gekf", "adam"])
def test_fast_dev_run(optim, tmp_path, data_dir):
    overrides = [
        f"optim={optim}",
        "debug=fdr",
        "model=small",
        "extras.print_config=false",
        *FAST_DATA,
    ]
    if optim == "rlekf":
        overrides.append("optim.optimizer.block_size=512")  # the small model has 1,505 weights
    cfg = compose_cfg("train", overrides, tmp_path, data_dir)
    metrics, objects = train(cfg)
    assert "val/force_rmse" in metrics
    assert torch.isfinite(torch.tensor(metrics["val/force_rmse"]))
    if optim != "adam":
        opt = objects["trainer"].optimizers[0]
        assert opt.n_updates == 5  # 1 energy + 24/6 force updates
        assert (len(opt.block_sizes) == 1) == (optim == "gekf")


def test_default_train_config_with_csv_logger_and_checkpoints(tmp_path, data_dir):
    overrides = [
        "model=small",
        "logger=csv",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=1",
        "+trainer.limit_test_batches=1",
        "extras.print_config=false",
        *FAST_DATA,
    ]
    cfg = compose_cfg("train", overrides, tmp_path, data_dir)
    metrics, _ = train(cfg)
    assert "test/force_rmse" in metrics
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert (tmp_path / "split.json").exists()
    assert (tmp_path / "csv" / "metrics.csv").exists()


def test_short_rlekf_run_reaches_measured_validation_force_rmse(tmp_path, data_dir):
    # forces start to learn once forgetting has inflated P (a few hundred updates, reference
    # §1.3 and peer lessons): 4 epochs of 36 single-frame batches = 720 Kalman updates
    overrides = [
        "model=small",
        "logger=none",
        "callbacks=none",
        "trainer.max_epochs=4",
        "extras.print_config=false",
        "test=false",
        *FAST_DATA,
        "data.batch_size=1",
    ]
    cfg = compose_cfg("train", overrides, tmp_path, data_dir)
    trainer, before, after = fit_from_cfg(cfg)
    assert trainer.optimizers[0].n_updates == 720  # the level is reached within this many
    assert after < PAPER_LEVEL, (before, after)
