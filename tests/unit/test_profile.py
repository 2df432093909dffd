"""Training-time accounting: StepTimer (rlekf-bench --profile) and EpochSummary's clocks, on
tiny Lightning modules whose parts sleep for known times, and the profile on tiny EMT data."""

from __future__ import annotations

import math
import time

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from rlekf.training.callbacks import EpochSummary, LastCheckpoint, StepTimer

DATA_S, FWD_S, OPT_S, REST_S, VAL_S = 0.010, 0.005, 0.020, 0.008, 0.030


class SlowData(Dataset):
    def __init__(self, n: int, sleep: float = DATA_S):
        self.n, self.sleep = n, sleep

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        time.sleep(self.sleep)
        return {"x": torch.ones(2), "n_atoms": torch.tensor(3)}


class SlowNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1)

    def forward(self, x):
        time.sleep(FWD_S)
        return self.lin(x)


class SlowOptimizer(torch.optim.SGD):
    """``step`` calls ``step_k`` (as a fused Kalman step would): one timed call, not two."""

    def step(self, closure=None):
        return self.step_k()

    def step_k(self):
        time.sleep(OPT_S)
        return super().step()


class Tiny(L.LightningModule):
    def __init__(self, first_batch_sleep: float = 0.0, train_sleep: float = REST_S):
        super().__init__()
        self.automatic_optimization = False
        self.model = SlowNet()
        self.first_batch_sleep = first_batch_sleep
        self.train_sleep = train_sleep
        self.seen = 0

    def training_step(self, batch, batch_idx):
        if self.seen == 0:
            time.sleep(self.first_batch_sleep)
        self.seen += 1
        opt = self.optimizers()
        loss = self.model(batch["x"]).sum()
        time.sleep(self.train_sleep)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()

    def validation_step(self, batch, batch_idx):
        time.sleep(VAL_S)
        self.log("val/force_rmse", 1.0, batch_size=1)

    def configure_optimizers(self):
        return SlowOptimizer(self.parameters(), lr=1e-3)


def _trainer(callbacks, tmp_path, **kw):
    kw = {"max_epochs": 1, "limit_val_batches": 0, "num_sanity_val_steps": 0, **kw}
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **kw,
    )


def test_step_timer_splits_known_delays(tmp_path):
    n, warmup = 6, 2
    timer = StepTimer(warmup=warmup)
    module = Tiny(first_batch_sleep=0.5)  # in a warm-up batch: must not be counted
    loader = DataLoader(SlowData(n + warmup), batch_size=1)
    t0 = time.perf_counter()
    _trainer([timer], tmp_path).fit(module, loader)
    outer = time.perf_counter() - t0
    s = timer.summary()
    assert s["batches"] == n and s["frames"] == n
    assert s["optimizer_calls"] == n  # step -> step_k counted once
    assert s["forward_calls"] == n
    # each part at least its sleeps, and not much more (scheduling noise on a loaded machine)
    assert n * OPT_S <= s["optimizer_s"] < n * OPT_S + 0.25
    assert n * FWD_S <= s["forward_s"] < n * FWD_S + 0.25
    assert n * DATA_S <= s["between_s"] < n * DATA_S + 0.5
    assert n * REST_S <= s["rest_of_step_s"] < n * REST_S + 0.5
    parts = s["optimizer_s"] + s["forward_s"] + s["rest_of_step_s"] + s["between_s"]
    assert parts == pytest.approx(s["total_s"], rel=1e-9)
    # the window's own clock agrees with the sum of the parts, and the warm-up is outside it
    assert s["window_s"] == pytest.approx(s["total_s"], rel=1e-6, abs=1e-6)
    assert s["total_s"] < 0.5 < outer
    # the optimizer instance and the model are restored after the fit
    opt = module.trainer.optimizers[0]
    assert "step" not in vars(opt) and "step_k" not in vars(opt)
    assert not module.model._forward_hooks and not module.model._forward_pre_hooks


def test_step_timer_rejects_negative_warmup():
    with pytest.raises(ValueError, match="warmup"):
        StepTimer(warmup=-1)


class StopAt(L.Callback):
    """Stop inside an epoch, as Lightning's ``max_time`` Timer does (``should_stop``)."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx + 1 == self.batch:
            trainer.should_stop = True


class Record(L.Callback):
    """The clocks EpochSummary logged at each validation."""

    def __init__(self):
        self.rows = []

    def on_validation_end(self, trainer, pl_module):
        m = trainer.callback_metrics
        if "time/train_s" in m:
            self.rows.append({k: float(m[k]) for k in m if k.startswith("time/")})


def test_epoch_summary_training_clock_excludes_validation_and_checkpoints(tmp_path):
    n_batches, n_val = 4, 3
    summary, rec = EpochSummary(), Record()
    # a checkpoint every optimizer step (inside the epoch) and at each epoch end
    last = LastCheckpoint(str(tmp_path / "ck"), every_n_steps=1)
    module = Tiny()
    train = DataLoader(SlowData(n_batches), batch_size=1)
    val = DataLoader(SlowData(n_val, sleep=0.0), batch_size=1)
    saves = []
    trainer = _trainer(
        [summary, last, StopAt(epoch=2, batch=1), rec],
        tmp_path,
        max_epochs=10,
        min_epochs=1,
        limit_val_batches=n_val,
        num_sanity_val_steps=1,
    )
    orig = trainer.save_checkpoint

    def slow_save(*a, **k):  # a checkpoint write that costs a known time
        time.sleep(0.05)
        saves.append(1)
        return orig(*a, **k)

    trainer.save_checkpoint = slow_save
    trainer.fit(module, train, val)
    assert trainer.save_checkpoint is slow_save  # EpochSummary put back what it wrapped
    assert len(rec.rows) == 3  # epochs 0, 1 and the one cut after 1 of 4 batches
    epochs = [r["time/epochs"] for r in rec.rows]
    assert epochs == pytest.approx([1.0, 2.0, 2.25])
    n_steps = 2 * n_batches + 1
    per_step = DATA_S + FWD_S + OPT_S + REST_S
    train_s = rec.rows[-1]["time/train_s"]
    elapsed = rec.rows[-1]["time/elapsed_s"]
    val_s = rec.rows[-1]["time/val_s"]
    assert len(saves) >= n_steps
    # training time: at least the sleeps of the training steps; validation (3 epochs x 3
    # batches x 30 ms + sanity check) and >= 9 checkpoint writes x 50 ms are outside it
    assert train_s >= n_steps * per_step
    assert val_s >= (3 * n_val + 1) * VAL_S
    assert elapsed - train_s >= val_s + len(saves) * 0.05 * 0.9
    # the clock is monotone across validations
    assert all(
        a["time/train_s"] < b["time/train_s"] for a, b in zip(rec.rows, rec.rows[1:], strict=False)
    )
    assert not math.isnan(train_s)


def test_epoch_summary_clock_runs_again_after_a_validation_inside_an_epoch(tmp_path):
    summary, rec = EpochSummary(), Record()
    module = Tiny()
    train = DataLoader(SlowData(4), batch_size=1)
    val = DataLoader(SlowData(2, sleep=0.0), batch_size=1)
    trainer = _trainer(
        [summary, rec], tmp_path, max_epochs=1, limit_val_batches=2, val_check_interval=2
    )
    trainer.fit(module, train, val)
    # validations after batches 2 and 4; the clock ran through all 4 training steps
    assert [r["time/epochs"] for r in rec.rows] == pytest.approx([0.5, 1.0])
    per_step = DATA_S + FWD_S + OPT_S + REST_S
    assert rec.rows[0]["time/train_s"] >= 2 * per_step
    assert rec.rows[1]["time/train_s"] >= 4 * per_step
    assert rec.rows[1]["time/val_s"] >= 4 * VAL_S


def test_epoch_summary_stops_the_fit_at_a_training_time_budget(tmp_path):
    budget = 0.3  # s of training: about 7 steps of ~43 ms, inside the second epoch
    summary, rec = EpochSummary(max_train_s=budget), Record()
    module = Tiny()
    train = DataLoader(SlowData(4), batch_size=1)
    val = DataLoader(SlowData(3, sleep=0.0), batch_size=1)
    trainer = _trainer([summary, rec], tmp_path, max_epochs=50, min_epochs=0, limit_val_batches=3)
    trainer.fit(module, train, val)
    per_step = DATA_S + FWD_S + OPT_S + REST_S
    last = rec.rows[-1]  # Lightning validated once more on stopping
    assert budget <= last["time/train_s"] < budget + per_step + 0.25
    # stopped, not run to max_epochs (a step's data loading may fall outside the clock)
    assert module.seen <= math.ceil(budget / (FWD_S + OPT_S + REST_S))
    assert last["time/epochs"] == pytest.approx(module.seen / 4)  # a cut epoch: its fraction
    # validation (90 ms each) is outside the budget: the fit ran past it in wall-clock
    assert last["time/elapsed_s"] >= last["time/train_s"] + last["time/val_s"]
    assert last["time/val_s"] >= len(rec.rows) * 3 * VAL_S


def test_epoch_summary_rejects_a_non_positive_budget():
    with pytest.raises(ValueError, match="max_train_s"):
        EpochSummary(max_train_s=0)


def test_profile_on_tiny_emt(tmp_path, data_dir):
    from rlekf.profile import PARTS, format_profile, profile
    from tests.helpers.hydra import FAST_DATA

    rows = profile(
        "cu_emt",
        ["rlekf", "rlekf_fused", "adam"],
        batches=2,
        warmup=1,
        overrides=["trainer=cpu", "model=small", f"paths.data_dir={data_dir}", *FAST_DATA],
        work=tmp_path,
    )
    by = {r["optim"]: r for r in rows}
    # paper mode: 1 energy + 24/6 force updates per batch, each a step; fused: one step
    assert by["rlekf"]["optimizer_calls"] == 2 * 5 and by["rlekf"]["forward_calls"] == 2 * 5
    assert by["rlekf_fused"]["optimizer_calls"] == 2 and by["adam"]["optimizer_calls"] == 2
    for r in rows:
        assert r["batches"] == 2 and r["frames"] == 4  # FAST_DATA: 2 frames per batch
        parts = sum(r[k] for k, _ in PARTS)
        assert parts == pytest.approx(r["total_s"], rel=1e-9)
        assert r["window_s"] == pytest.approx(r["total_s"], rel=1e-6)
        assert 0 < r["optimizer_s"] < r["step_s"] and r["forward_s"] > 0
        assert r["total_s"] < r["fit_s"]
    assert by["adam"]["ratio_to_adam"] == 1.0
    assert by["rlekf"]["ratio_to_adam"] == pytest.approx(
        by["rlekf"]["s_per_frame"] / by["adam"]["s_per_frame"]
    )
    table = format_profile(rows)
    assert table.count("\n| rlekf") == 2 and "| adam |" in table
