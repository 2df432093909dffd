"""The step-0 validation (``EpochSummary(initial_point=True)``) and the dead time read from it."""

from __future__ import annotations

import csv

import pytest
import torch

from rlekf import keys as K
from rlekf.data import collate_atoms
from rlekf.runs import best, dead_time, initial_point, reach, read_metrics_csv
from rlekf.train import train
from tests.helpers.hydra import FAST_DATA, compose_cfg

OVERRIDES = [
    "model=small",
    "logger=csv",
    "test=false",
    "trainer.max_epochs=2",
    "trainer.val_check_interval=0.5",
    "extras.print_config=false",
    "~callbacks.rich_progress_bar",
    "~callbacks.parity_plots",
    *FAST_DATA,
]


def _untrained_val_rmse(tmp_path, data_dir) -> tuple[float, float]:
    """Force (eV/Å) and energy (eV/atom) RMSE of the untrained model over the validation split,
    computed here by hand from a model built with the same seed (no training run)."""
    cfg = compose_cfg("train", [*OVERRIDES, "train=false"], tmp_path / "ref", data_dir)
    _, objects = train(cfg)
    datamodule, model = objects["datamodule"], objects["model"]
    datamodule.setup("fit")
    model.set_statistics(datamodule.stats())
    dataset = datamodule.datasets["val"]
    batch = collate_atoms([dataset[i] for i in range(len(dataset))])
    pred = model(batch, forces=True)
    f_rmse = torch.sqrt(torch.mean((pred[K.FORCES] - batch[K.FORCES]) ** 2)).item()
    n = batch[K.N_ATOMS].double()
    e_rmse = torch.sqrt(torch.mean(((pred[K.ENERGY] - batch[K.ENERGY]) / n) ** 2)).item()
    return f_rmse, e_rmse


@pytest.mark.parametrize("optim", ["rlekf", "adam"])
def test_initial_point_is_the_untrained_models_validation(optim, tmp_path, data_dir):
    over = [
        f"optim={optim}",
        "trainer.num_sanity_val_steps=-1",
        "callbacks.epoch_summary.initial_point=true",
    ]
    cfg = compose_cfg("train", [*OVERRIDES, *over], tmp_path / "run", data_dir)
    train(cfg)
    curve, _ = read_metrics_csv(tmp_path / "run" / "csv" / "metrics.csv")
    start = initial_point(curve)
    assert start is not None and curve[0] is start
    assert start.epochs == 0.0 and start.train_s == 0.0 and start.step == 0
    assert start.optimizer_steps == 0.0
    f_ref, e_ref = _untrained_val_rmse(tmp_path, data_dir)
    assert start.force_rmse == pytest.approx(f_ref, rel=1e-9)
    assert start.energy_rmse == pytest.approx(e_ref, rel=1e-9)
    # two validations per epoch after it, with their own clocks
    assert [p.epochs for p in curve[1:]] == pytest.approx([0.5, 1.0, 1.5, 2.0], abs=0.05)
    assert all(0 < a.train_s < b.train_s for a, b in zip(curve[1:], curve[2:], strict=False))
    # optimizer steps: 5 Kalman updates per batch in paper mode (1 energy + 24/6 force), one
    # Adam step per batch; 18 batches of 2 frames per epoch, validated every 9 batches
    per_batch = 5 if optim == "rlekf" else 1
    assert [p.optimizer_steps for p in curve[1:]] == [per_batch * 9 * k for k in (1, 2, 3, 4)]
    # the step-0 point is a reference only: no best, no target reached at step 0
    assert best([curve], "force") == min(p.force_rmse for p in curve[1:])
    assert reach(curve, "force", start.force_rmse + 1.0) is curve[1]


def test_no_initial_point_without_the_whole_sanity_check(tmp_path, data_dir):
    # num_sanity_val_steps=2 validates only part of the split: no step-0 point is logged
    over = [
        "optim=adam",
        "trainer.num_sanity_val_steps=2",
        "callbacks.epoch_summary.initial_point=true",
    ]
    cfg = compose_cfg("train", [*OVERRIDES, *over], tmp_path, data_dir)
    train(cfg)
    curve, _ = read_metrics_csv(tmp_path / "csv" / "metrics.csv")
    assert initial_point(curve) is None and curve[0].epochs > 0
    with pytest.raises(ValueError, match="no validation at step 0"):
        dead_time(curve)


def test_energy_warm_start_in_a_training_run(tmp_path, data_dir):
    """``optim.updater.energy_warmup_batches=27``: 1 Kalman update per batch for 27 batches,
    then 5; the energy-only epoch logs training energy metrics but no training force metrics."""
    over = ["optim=rlekf", "optim.updater.energy_warmup_batches=27"]
    cfg = compose_cfg("train", [*OVERRIDES, *over], tmp_path, data_dir)
    train(cfg)
    metrics = tmp_path / "csv" / "metrics.csv"
    curve, _ = read_metrics_csv(metrics)
    # validated every 9 batches of 18 per epoch: after 9, 18, 27 energy-only batches, then 9
    # batches of 1 energy + 24/6 force updates
    assert [p.optimizer_steps for p in curve] == [9, 18, 27, 27 + 9 * 5]
    with open(metrics, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("train/energy_rmse")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert rows[0]["train/force_rmse"] == ""  # epoch 0: no force measurement, no force metric
    assert float(rows[1]["train/force_rmse"]) > 0
