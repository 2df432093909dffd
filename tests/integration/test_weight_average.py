"""WeightAverage: an EMA of the weights, recomputed here from the raw weights of every batch;
validation and the best checkpoint see it, training and exact resume do not."""

from __future__ import annotations

import csv
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch

from rlekf.training.averaging import WeightAverage, batches_trained
from rlekf.training.metrics import ForceFieldMetrics
from rlekf.utils.instantiate import instantiate_many
from tests.helpers.callbacks import StopAfter
from tests.helpers.hydra import FAST_DATA, compose_cfg

DECAY = 0.5
AVERAGE = [
    "+callbacks.weight_average._target_=rlekf.training.averaging.WeightAverage",
    f"+callbacks.weight_average.decay={DECAY}",
]


class Recorder(L.Callback):
    """The raw weights after every training batch (listed after WeightAverage)."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.weights.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def _run(tmp_path: Path, data_dir, extra=(), ckpt_path=None, stop_after=None):
    overrides = [
        "model=small",
        "logger=csv",
        "trainer.max_epochs=2",
        "extras.print_config=false",
        "test=false",
        "trainer.log_every_n_steps=1",
        "optim.optimizer.block_size=256",
        *FAST_DATA,
        "data.path.n_frames=24",
        "data.n_blocks=6",
        "data.val_fraction=0.17",
        "data.test_fraction=0.17",
        *extra,
    ]
    cfg = compose_cfg("train", overrides, tmp_path, data_dir)
    L.seed_everything(cfg.seed)
    dm = hydra.utils.instantiate(cfg.data)
    task = hydra.utils.instantiate(cfg.task, model=hydra.utils.instantiate(cfg.model))
    recorder = Recorder()
    callbacks = [*instantiate_many(cfg.callbacks, "callback"), recorder]
    if stop_after is not None:
        callbacks.append(StopAfter(stop_after))
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=instantiate_many(cfg.logger, "logger")
    )
    trainer.fit(task, datamodule=dm, ckpt_path=ckpt_path)
    average = next((c for c in trainer.callbacks if isinstance(c, WeightAverage)), None)
    return trainer, task, dm, recorder, average


def _ema(weights: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    avg = {n: w.clone() for n, w in weights[0].items()}  # the first batch is copied
    for w in weights[1:]:
        avg = {n: DECAY * avg[n] + (1 - DECAY) * w[n] for n in avg}
    return avg


def _val_force_rmse(task, dm, params: dict[str, torch.Tensor]) -> float:
    model = task.model
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(params[n])
    metrics = ForceFieldMetrics()
    with torch.enable_grad():
        for batch in dm.val_dataloader():
            metrics.update(model(batch, forces=True), batch)
    return float(metrics.compute()["force_rmse"])


def _last_val_force(csv_dir: Path) -> float:
    (path,) = list(csv_dir.rglob("metrics.csv"))
    with path.open(newline="") as fh:
        vals = [r["val/force_rmse"] for r in csv.DictReader(fh) if r.get("val/force_rmse")]
    return float(vals[-1])


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> bool:
    if a.keys() != b.keys():
        return False
    if exact:
        return all(torch.equal(a[n], b[n]) for n in a)
    return all(torch.allclose(a[n], b[n], rtol=1e-12, atol=1e-15) for n in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    plain_dir = tmp_path_factory.mktemp("plain")
    avg_dir = tmp_path_factory.mktemp("avg")
    plain = _run(plain_dir, data_dir)
    averaged = _run(avg_dir, data_dir, AVERAGE)
    return plain, averaged, avg_dir, data_dir


def test_training_is_unchanged_and_the_average_is_the_ema_of_the_raw_weights(runs):
    (_, plain_task, _, plain_rec, _), (trainer, task, dm, rec, average), out, _ = runs
    assert average is not None and average.decay == DECAY
    raw = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    # the optimizer saw the raw weights only: the same trajectory, bit for bit
    assert len(rec.weights) == len(plain_rec.weights) > 2
    assert all(
        _same(a, b, exact=True) for a, b in zip(rec.weights, plain_rec.weights, strict=True)
    )
    assert _same(raw, rec.weights[-1], exact=True)  # after the fit the raw weights are back in
    ema = _ema(rec.weights)
    assert average.n_averaged == len(rec.weights)
    assert _same(average.averaged_parameters(), ema)
    assert not _same(ema, raw)
    # validation saw the average: the last logged val force RMSE is the average's
    logged = _last_val_force(out)
    ema_rmse, raw_rmse = _val_force_rmse(task, dm, ema), _val_force_rmse(task, dm, raw)
    assert logged == pytest.approx(ema_rmse, rel=1e-6)  # logged as float32
    assert abs(logged - raw_rmse) > 10 * abs(logged - ema_rmse)


def test_best_checkpoint_holds_the_average_and_last_checkpoint_the_raw_weights(runs):
    _, (trainer, task, dm, rec, average), out, _ = runs
    per_epoch = len(rec.weights) // 2
    best = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=False)
    upto = per_epoch * (best["epoch"] + 1)
    ema_then = _ema(rec.weights[:upto])
    best_params = {
        k.removeprefix("model."): v
        for k, v in best["state_dict"].items()
        if k.startswith("model.")
    }
    best_params = {n: best_params[n] for n in ema_then}
    assert _same(best_params, ema_then)
    assert not _same(best_params, rec.weights[upto - 1])
    last = torch.load(Path(out) / "checkpoints" / "last.ckpt", weights_only=False)
    last_params = {n: last["state_dict"][f"model.{n}"] for n in rec.weights[-1]}
    assert _same(last_params, rec.weights[-1], exact=True)
    state = last["weight_average"]
    assert state["n_averaged"] == len(rec.weights) == state["batches_seen"]
    assert _same(state["params"], _ema(rec.weights))


def test_resume_continues_the_average(runs, tmp_path):
    _, (_, task, _, rec, average), _, data_dir = runs
    first = tmp_path / "first"
    _run(first, data_dir, AVERAGE, stop_after=0)
    ckpt = first / "checkpoints" / "last.ckpt"
    _, resumed_task, _, _, resumed = _run(tmp_path / "second", data_dir, AVERAGE, ckpt_path=ckpt)
    assert resumed.n_averaged == average.n_averaged
    assert _same(resumed.averaged_parameters(), average.averaged_parameters())
    raw = {n: p.detach() for n, p in resumed_task.model.named_parameters()}
    assert _same(raw, rec.weights[-1], exact=True)


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(decay=1.0)
    with pytest.raises(ValueError, match="start_batch"):
        WeightAverage(start_batch=-1)


def test_start_batch_delays_the_average():
    model = torch.nn.Linear(2, 1, dtype=torch.float64)
    holder = type("M", (), {"model": model})()
    wa = WeightAverage(decay=DECAY, start_batch=2)
    wa.setup(None, holder, "fit")
    seen = []
    for step in range(4):
        wa.on_train_batch_start(None, holder, None, step)
        with torch.no_grad():
            model.weight.add_(1.0)
        seen.append(model.weight.detach().clone())
        wa.on_train_batch_end(None, holder, None, None, step)
    assert wa.n_averaged == 2  # batches 3 and 4
    expected = DECAY * seen[2] + (1 - DECAY) * seen[3]
    assert torch.allclose(wa.averaged_parameters()["weight"], expected, rtol=1e-12)


def test_resume_with_another_decay_warns_and_keeps_the_saved_average(caplog):
    model = torch.nn.Linear(2, 1, dtype=torch.float64)
    holder = type("M", (), {"model": model})()
    saved = WeightAverage(decay=0.9)
    saved.setup(None, holder, "fit")
    for step in range(3):
        saved.on_train_batch_start(None, holder, None, step)
        with torch.no_grad():
            model.weight.add_(1.0)
        saved.on_train_batch_end(None, holder, None, None, step)
    checkpoint = {"state_dict": {}}
    saved.on_save_checkpoint(None, holder, checkpoint)
    for decay, warned in ((0.9, False), (0.99, True)):
        caplog.clear()
        resumed = WeightAverage(decay=decay)
        with caplog.at_level("WARNING", logger="rlekf.training.averaging"):
            resumed.on_load_checkpoint(None, holder, checkpoint)
        assert ("decay 0.9, this run continues it with decay 0.99" in caplog.text) is warned
        assert resumed.n_averaged == saved.n_averaged == 3
        assert _same(resumed.averaged_parameters(), saved.averaged_parameters(), exact=True)


def test_callbacks_ema_is_the_default_callbacks_plus_the_average(tmp_path):
    from rlekf.training.callbacks import LastCheckpoint

    default = instantiate_many(compose_cfg("train", [], tmp_path).callbacks, "callback")
    ema = instantiate_many(compose_cfg("train", ["callbacks=ema"], tmp_path).callbacks, "callback")
    averages = [c for c in ema if isinstance(c, WeightAverage)]
    assert len(averages) == 1 and averages[0].decay == 0.95 and averages[0].start_batch == 0
    assert [type(c) for c in ema if not isinstance(c, WeightAverage)] == [type(c) for c in default]
    assert any(isinstance(c, LastCheckpoint) for c in ema)
    assert not any(isinstance(c, WeightAverage) for c in default)


def test_resume_without_a_saved_average_counts_the_trained_batches(runs, caplog):
    (trainer, _, _, rec, _), *_ = runs
    # Lightning's own checkpoint of the plain run: its loop state counts every trained batch
    checkpoint = trainer._checkpoint_connector.dump_checkpoint()
    assert batches_trained(checkpoint) == len(rec.weights) > 3
    assert batches_trained({"state_dict": {}}) == 0
    model = torch.nn.Linear(2, 1, dtype=torch.float64)
    holder = type("M", (), {"model": model})()
    done = len(rec.weights)
    # start_batch counts from the start of the run, not from the resume
    for start, averaged in ((done + 1, 1), (0, 2)):
        wa = WeightAverage(decay=DECAY, start_batch=start)
        with caplog.at_level("INFO", logger="rlekf.training.averaging"):
            wa.on_load_checkpoint(None, holder, checkpoint)
        assert f"{done} training batches done" in caplog.text
        wa.setup(None, holder, "fit")
        for step in range(2):
            wa.on_train_batch_start(None, holder, None, step)
            wa.on_train_batch_end(None, holder, None, None, step)
        assert wa.n_averaged == averaged
