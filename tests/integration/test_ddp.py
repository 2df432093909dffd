"""Adam through Lightning DDP on 2 CPU processes (gloo): ranks share data and stay identical."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.helpers.hydra import FAST_DATA

ROOT = Path(__file__).resolve().parents[2]


def test_adam_ddp_two_cpu_processes_keep_identical_weights(tmp_path):
    out = tmp_path / "sums"
    args = [
        sys.executable,
        "-m",
        "rlekf.train",
        "optim=adam",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "model=small",
        "trainer.max_epochs=1",
        "test=false",
        "+trainer.limit_val_batches=2",
        "logger=none",
        "extras.print_config=false",
        "~callbacks.rich_progress_bar",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={tmp_path / 'run'}",
        *FAST_DATA,
        "+callbacks.weight_checksum._target_=tests.helpers.ddp_check.WeightChecksum",
        f"+callbacks.weight_checksum.dirpath={out}",
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    # 36 training frames, batch 2 -> 18 batches, 9 per rank: each rank saw half of the data
    assert r0["steps"] == r1["steps"] == 9
    assert torch.equal(r0["weights"], r1["weights"])  # gradients were all-reduced
