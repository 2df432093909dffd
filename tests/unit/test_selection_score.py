"""Checkpoint selection on a combined score: the pure function, its checks, the logged metric
and the checkpoint it selects (a tiny fit with an independent recomputation)."""

from __future__ import annotations

import math

import pytest


def test_selection_score_sums_each_error_in_units_of_its_scale():
    from rlekf.training.metrics import selection_score

    scales = {"energy_rmse": 2.0e-3, "force_rmse": 0.05}
    assert selection_score({"energy_rmse": 6.0e-3, "force_rmse": 0.1}, scales) == pytest.approx(
        3.0 + 2.0
    )
    # metrics outside the scales play no part; a metric the scales name but the stage lacks
    # gives nan (never a silently smaller score)
    assert selection_score(
        {"energy_rmse": 2.0e-3, "force_rmse": 0.05, "energy_mae": 9.0}, scales
    ) == pytest.approx(2.0)
    assert math.isnan(selection_score({"energy_rmse": 2.0e-3}, scales))


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ({}, "empty"),
        ({"force": 0.06}, "unknown metric 'force'"),
        ({"energy_mean_error": 1e-3}, "unknown metric 'energy_mean_error'"),
        ({"force_rmse": 0.0}, "positive and finite"),
        ({"force_rmse": -0.1}, "positive and finite"),
        ({"force_rmse": float("nan")}, "positive and finite"),
        ({"force_rmse": "small"}, "must be a number"),
    ],
)
def test_score_scales_are_refused_with_the_reason(scales, message):
    from rlekf.training.metrics import check_score_scales

    with pytest.raises(ValueError, match=message):
        check_score_scales(scales)


def test_a_score_monitor_without_scales_is_refused_before_any_work(tmp_path, data_dir):
    from rlekf.train import train
    from rlekf.training.metrics import check_monitor
    from tests.helpers.hydra import FAST_DATA, compose_cfg

    check_monitor("val/force_rmse", None)
    check_monitor("val/score", {"force_rmse": 0.06})
    with pytest.raises(ValueError, match="needs task.score_scales"):
        check_monitor("val/score", None)
    cfg = compose_cfg(
        "train", ["monitor=val/score", "extras.print_config=false", *FAST_DATA], tmp_path, data_dir
    )
    with pytest.raises(ValueError, match="monitor=val/score needs task.score_scales"):
        train(cfg)


def test_the_best_checkpoint_by_score_is_the_epoch_with_the_lowest_recomputed_score(
    tmp_path, monkeypatch, data_dir
):
    """A 4-epoch Adam fit with ``monitor=val/score``: the logged score is the scaled sum of the
    logged RMSEs, and the checkpoint callback keeps the epoch where that sum is lowest."""
    import lightning as L

    from rlekf.train import train
    from tests.helpers.hydra import FAST_DATA, compose_cfg

    seen: list[tuple[int, float, float, float]] = []

    class Record(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            v = pl_module.last_eval_metrics["val"]
            seen.append((trainer.current_epoch, v["energy_rmse"], v["force_rmse"], v["score"]))

    s_e, s_f = 4.0e-3, 0.08
    overrides = [
        "optim=adam",
        "model=small",
        "logger=none",
        "test=false",
        "trainer.max_epochs=4",
        "trainer.num_sanity_val_steps=0",
        "+trainer.limit_train_batches=6",
        "extras.print_config=false",
        "~callbacks.rich_progress_bar",
        "~callbacks.parity_plots",
        "~callbacks.block_partition",
        f"task.score_scales={{energy_rmse: {s_e}, force_rmse: {s_f}}}",
        "monitor=val/score",
        *FAST_DATA,
    ]
    cfg = compose_cfg("train", overrides, tmp_path, data_dir)
    import rlekf.train as train_module

    original = train_module.instantiate_many

    def with_record(cfg_group, what):
        out = original(cfg_group, what)
        return [*out, Record()] if what == "callback" else out

    monkeypatch.setattr(train_module, "instantiate_many", with_record)
    _, objects = train(cfg)
    assert len(seen) == 4
    for _, e, f, score in seen:
        assert score == pytest.approx(e / s_e + f / s_f, rel=1e-12)
    best_epoch = min(seen, key=lambda t: t[3])[0]
    ckpt = objects["trainer"].checkpoint_callback
    assert ckpt.monitor == "val/score"
    assert ckpt.best_model_path.endswith(f"best_weights_epoch_{best_epoch:03d}.ckpt")
    assert float(ckpt.best_model_score) == pytest.approx(min(t[3] for t in seen), rel=1e-6)


def test_metric_names_are_the_metrics_the_stages_compute():
    from rlekf.training.metrics import METRIC_NAMES, ForceFieldMetrics

    assert set(ForceFieldMetrics(virial=True).metrics.keys()) == set(METRIC_NAMES)


def test_score_scales_from_a_hydra_mapping_become_plain_floats():
    from omegaconf import OmegaConf

    from rlekf.training.metrics import check_score_scales

    out = check_score_scales(OmegaConf.create({"energy_rmse": 2.21e-3, "force_mae": "0.06"}))
    assert out == {"energy_rmse": 2.21e-3, "force_mae": 0.06}
    assert all(type(v) is float for v in out.values())
    with pytest.raises(ValueError, match="must map metric names"):
        check_score_scales(["force_rmse", 0.06])


def _fit_score(scales, frames, train_virial=None):
    import functools

    import torch
    from torch.utils.data import DataLoader

    from rlekf.data.dataset import AtomsDataset, GroupedBatchSampler, collate_atoms
    from rlekf.models import DeepPotential
    from rlekf.training import ForceFieldModule, GradientUpdater
    from tests.helpers.trainer import bare_trainer

    ds = AtomsDataset(frames, ["Cu"], 5.0, [60])

    def loader():
        return DataLoader(
            ds,
            batch_sampler=GroupedBatchSampler(ds.n_atoms, 1, shuffle=False),
            collate_fn=collate_atoms,
        )

    model = DeepPotential(
        ["Cu"], rcut=5.0, sel=[60], embedding=(4, 8), fitting=(8,), axis_neuron=4, seed=0
    )
    task = ForceFieldModule(
        model,
        functools.partial(torch.optim.Adam, lr=1e-3),
        GradientUpdater(),
        train_virial=train_virial,
        score_scales=scales,
    )
    trainer = bare_trainer()
    trainer.fit(task, train_dataloaders=loader(), val_dataloaders=loader())
    return task


def test_a_score_that_validation_cannot_compute_stops_the_fit_with_the_metric_named():
    import dataclasses

    from tests.helpers.frames import cu_frame

    frames = [cu_frame(1, seed=s) for s in range(2)]
    scales = {"force_rmse": 0.1, "virial_rmse": 0.01}
    # not validated on virials (Adam's default loss has no virial term): refused at fit start
    with pytest.raises(ValueError, match="names virial_rmse, but this fit does not validate"):
        _fit_score(scales, frames)
    # asked to validate on virials, but no frame has a label: the validation stops it
    unlabelled = [dataclasses.replace(f, virial=None) for f in frames]
    with pytest.raises(ValueError, match=r"names \['virial_rmse'\], which validation did not"):
        _fit_score(scales, unlabelled, train_virial=True)
    # the same scales where validation computes them: a score, no error, nothing in training
    task = _fit_score(scales, frames, train_virial=True)
    val = task.last_eval_metrics["val"]
    assert val["score"] == pytest.approx(val["force_rmse"] / 0.1 + val["virial_rmse"] / 0.01)
    assert "score" not in task.last_eval_metrics["train"]
