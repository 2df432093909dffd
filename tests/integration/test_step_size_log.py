"""The StepSizeLog callback: one CSV row per training batch with the batch's weight step."""

from __future__ import annotations

import csv

import hydra
import lightning as L
import pytest
import torch

from rlekf.data import keys as K
from rlekf.training.callbacks import StepSizeLog
from tests.helpers.hydra import FAST_DATA, compose_cfg


def test_step_size_log_records_each_batch_weight_step(tmp_path, data_dir):
    overrides = [
        "model=small",
        "optim.optimizer.block_size=512",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=0",
        "extras.print_config=false",
        *FAST_DATA,
    ]
    cfg = compose_cfg("train", overrides, tmp_path, data_dir)
    L.seed_everything(0)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    task = hydra.utils.instantiate(cfg.task, model=model)
    trainer = hydra.utils.instantiate(
        cfg.trainer, logger=False, callbacks=[StepSizeLog()], default_root_dir=str(tmp_path)
    )
    datamodule.setup("fit")
    model.set_statistics(datamodule.stats())
    w0 = torch.cat([p.detach().reshape(-1).double().clone() for p in model.parameters()])
    batch = next(iter(datamodule.train_dataloader()))
    n = batch[K.N_ATOMS].double()
    with torch.no_grad():
        e0 = model(batch, forces=False)[K.ENERGY].double() / n
    trainer.fit(task, datamodule=datamodule)
    w1 = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
    with torch.no_grad():
        e1 = model(batch, forces=False)[K.ENERGY].double() / n
    with open(tmp_path / "step_sizes.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1
    row = rows[0]
    assert int(row["n_atoms"]) == 32
    assert float(row["step_norm"]) == torch.linalg.vector_norm(w1 - w0).item()
    assert float(row["max_step"]) == (w1 - w0).abs().max().item()
    assert float(row["energy_error"]) > 0
    # the trained batch is the loader's first (same seed): signed offset before, change after
    bias = torch.mean(e0 - batch[K.ENERGY].double() / n).item()
    assert float(row["energy_bias"]) == pytest.approx(bias, rel=1e-9, abs=1e-12)
    assert float(row["energy_error"]) == pytest.approx(abs(bias), rel=1e-9)  # one frame
    assert float(row["energy_change"]) == pytest.approx(torch.mean(e1 - e0).item(), rel=1e-6)
    assert float(row["energy_change"]) != 0
    assert float(row["innovation"]) == trainer.optimizers[0].last_innovation
    assert int(row["step"]) == trainer.optimizers[0].n_updates == 5
