"""Lightning DDP on 2 CPU processes (gloo): Adam (DDP gradients) and RLEKF (sharded P)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from rlekf.models import DeepPotential
from rlekf.optim import RLEKF, state_covariance
from tests.helpers.hydra import FAST_DATA

ROOT = Path(__file__).resolve().parents[2]
# 36 training frames, batch 2 -> 18 batches, 9 per rank
BATCHES_PER_RANK = 9
# a guard against a hang, not a speed requirement (beside other jobs a run takes minutes)
TIMEOUT_S = 1200
_RENDEZVOUS_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "NODE_RANK",
    "GROUP_RANK",
    "TORCHELASTIC_RUN_ID",
)


def _train_ddp(tmp_path: Path, run: str, *overrides: str) -> Path:
    """``rlekf-train trainer=ddp`` on 2 CPU processes; returns the run folder."""
    run_dir = tmp_path / run
    args = [
        sys.executable,
        "-m",
        "rlekf.train",
        "trainer=ddp",
        "trainer.devices=2",
        "trainer.accelerator=cpu",
        "model=small",
        "test=false",
        "+trainer.limit_val_batches=2",
        "logger=none",
        "extras.print_config=false",
        "~callbacks.rich_progress_bar",
        f"paths.data_dir={tmp_path / 'data'}",
        f"hydra.run.dir={run_dir}",
        *FAST_DATA,
        "+callbacks.weight_checksum._target_=tests.helpers.ddp_check.WeightChecksum",
        f"+callbacks.weight_checksum.dirpath={run_dir / 'sums'}",
        *overrides,
    ]
    # no rendezvous variables from the calling process (e.g. a MASTER_PORT left by an earlier
    # run): Lightning picks a fresh free port for every run
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS_VARS}
    env.update(
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    proc = subprocess.run(
        args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return run_dir


def _sums(run_dir: Path) -> tuple[dict, dict]:
    r0, r1 = (torch.load(run_dir / "sums" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    return r0, r1


def test_adam_ddp_two_cpu_processes_keep_identical_weights(tmp_path):
    run = _train_ddp(tmp_path, "adam", "optim=adam", "trainer.max_epochs=1")
    r0, r1 = _sums(run)
    assert r0["steps"] == r1["steps"] == BATCHES_PER_RANK  # each rank saw half of the data
    assert torch.equal(r0["weights"], r1["weights"])  # gradients were all-reduced


def test_rlekf_ddp_sharded_checkpoint_and_exact_resume(tmp_path):
    """optim=rlekf under trainer=ddp: sharded P, identical replicas, full-P checkpoint, resume.

    The 2-epoch run is compared with a 1-epoch run resumed (new processes) for one more
    epoch from its last.ckpt: weights, every P block and lambda must match bit for bit.
    """
    base = ("optim=rlekf", "optim.optimizer.block_size=512")
    full = _train_ddp(tmp_path, "full", *base, "trainer.max_epochs=2")
    r0, r1 = _sums(full)
    assert torch.equal(r0["weights"], r1["weights"])  # replicas identical
    assert r0["steps"] == 2 * BATCHES_PER_RANK * 5  # 1 energy + 4 force updates per batch

    ckpt = torch.load(full / "checkpoints" / "last.ckpt", weights_only=False)
    model = DeepPotential(**ckpt["model_config"])
    ref = RLEKF(model.parameters(), block_size=512)
    assert len(ref.block_sizes) >= 3  # several blocks, so that both ranks own some
    opt_state = ckpt["optimizer_states"][0]
    assert "sharding" not in opt_state  # the gathered, single-process form
    blocks = state_covariance(opt_state)
    assert [b.shape[0] for b in blocks] == ref.block_sizes  # ALL blocks, not rank 0's
    assert opt_state["state"][0]["n_updates"] == 2 * BATCHES_PER_RANK * 5
    ref.load_state_dict(opt_state)  # loadable by a single process
    assert all(not torch.equal(b, torch.eye(b.shape[0], dtype=b.dtype)) for b in blocks)

    first = _train_ddp(tmp_path, "first", *base, "trainer.max_epochs=1")
    resumed = _train_ddp(
        tmp_path,
        "resumed",
        *base,
        "trainer.max_epochs=2",
        f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
    )
    q0, q1 = _sums(resumed)
    assert torch.equal(q0["weights"], r0["weights"]) and torch.equal(q1["weights"], r1["weights"])
    ck2 = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    s1, s2 = opt_state["state"][0], ck2["optimizer_states"][0]["state"][0]
    assert s1["lam"] == s2["lam"] and s1["n_updates"] == s2["n_updates"]
    for a, b in zip(s1["P"], s2["P"], strict=True):
        assert torch.equal(a, b)


def test_rlekf_fused_ddp_keeps_identical_replicas(tmp_path):
    run = _train_ddp(
        tmp_path,
        "fused",
        "optim=rlekf_fused",
        "optim.optimizer.block_size=512",
        "trainer.max_epochs=1",
    )
    r0, r1 = _sums(run)
    assert torch.equal(r0["weights"], r1["weights"])
    assert r0["steps"] == BATCHES_PER_RANK  # one rank-5 update per batch
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["optimizer_states"][0]["state"][0]["n_updates"] == 5 * BATCHES_PER_RANK
