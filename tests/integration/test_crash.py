"""Crash safety: SIGKILL in training or mid-checkpoint-write leaves a loadable last.ckpt."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers.hydra import FAST_DATA

ROOT = Path(__file__).resolve().parents[2]


def _start(out: Path, data_dir: Path) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "rlekf.train",
        "model=small",
        "logger=none",
        "test=false",
        "extras.print_config=false",
        "optim.optimizer.block_size=null",
        "model.fitting=[64,64]",
        "trainer.max_epochs=50",
        "callbacks.last_checkpoint.every_n_steps=1",
        "~callbacks.rich_progress_bar",
        f"hydra.run.dir={out}",
        f"paths.data_dir={data_dir}",
        *FAST_DATA,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="offline")
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )


@pytest.mark.parametrize(
    "delay",
    [pytest.param(0.0, marks=pytest.mark.slow), 0.37, pytest.param(1.3, marks=pytest.mark.slow)],
)
def test_sigkill_leaves_a_loadable_last_checkpoint(delay, tmp_path, tmp_path_factory):
    data_dir = tmp_path_factory.getbasetemp() / "crash_data"
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "last.ckpt"
    proc = _start(out, data_dir)
    try:
        deadline = time.time() + 120
        while not ckpt.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "no checkpoint written in time"
            time.sleep(0.05)
        time.sleep(delay)  # checkpoints are rewritten after every update: likely mid-write
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    opt = state["optimizer_states"][0]["state"]
    p_blocks = next(v["P"] for v in opt.values() if "P" in v)
    assert p_blocks[0].dtype == torch.float64 and torch.isfinite(p_blocks[0]).all()
    assert state["updater_state"]["generator"].dtype == torch.uint8
    assert "model_config" in state and state["global_step"] >= 1
