"""Sweep files compose, launchers compose, and a smoke sweep runs end to end into a report."""

from __future__ import annotations

import csv
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import hydra
import pytest
import torch
import yaml
from hydra.types import RunMode
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf

from rlekf.optim import RLEKF
from rlekf.training.wandb_extras import BlockPartition, parity_figure, partition_table
from tests.helpers.hydra import CONFIG_DIR, compose_cfg

ROOT = CONFIG_DIR.parent
SWEEPS = sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))
FULL_SWEEPS = [s for s in SWEEPS if not s.startswith("smoke_")]


def _params(cfg) -> dict[str, list[str]]:
    return {k: str(v).split(",") for k, v in cfg.hydra.sweeper.params.items()}


def test_every_sweep_has_a_smoke_variant():
    assert set(FULL_SWEEPS) == {
        "block_size",
        "block_size_cu_pwmat",
        "block_size_si_mlearn",
        "dead_time_cu_pwmat",
        "divergence_cu_pwmat",
        "divergence_sgd_cu_pwmat",
        "init",
        "init_cu_pwmat",
        "block_size_x_init",
        "optimizer_compare",
        "warm_start_cu_pwmat",
    }
    assert {f"smoke_{s}" for s in FULL_SWEEPS} <= set(SWEEPS)


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_composes(sweep, tmp_path):
    cfg = compose_cfg("train", [f"sweep={sweep}"], tmp_path)
    assert cfg.hydra.mode == RunMode.MULTIRUN
    params = _params(cfg)
    assert len(params["seed"]) >= 2
    assert len(params) >= 2
    assert cfg.task_name == f"sweep_{sweep}"  # runs land in logs/sweep_<name>/multiruns/
    # rlekf-report reads csv/metrics.csv: every sweep logs to csv
    assert "csv" in cfg.logger and "_target_" in cfg.logger.csv
    assert OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
    assert "seed" in cfg.hydra.job.config.override_dirname.exclude_keys
    if sweep.startswith("smoke_"):
        assert cfg.hydra.runtime.choices.model == "small"
        assert cfg.logger.get("wandb") is None
        # the same grid as the full sweep (only the data presets shrink to the tiny EMT set)
        full = _params(compose_cfg("train", [f"sweep={sweep[6:]}"], tmp_path))
        assert params.keys() == full.keys()
        assert all(params[k] == full[k] for k in params if k != "data")
    else:
        assert cfg.logger.wandb.group == cfg.task_name


@pytest.mark.parametrize("sweep", SWEEPS)
@pytest.mark.parametrize("which", [0, -1])
def test_sweep_jobs_compose(sweep, which, tmp_path):
    """The first and the last job of the grid compose, and the swept values land in the config."""
    base = compose_cfg("train", [f"sweep={sweep}"], tmp_path)
    job = [f"{k}={v[which]}" for k, v in _params(base).items()]
    cfg = compose_cfg("train", [f"sweep={sweep}", *job], tmp_path)
    for override in job:
        key, value = override.split("=", 1)
        if "/" in key or key in ("optim", "data"):  # a config group
            assert cfg.hydra.runtime.choices[key] == value
        else:
            got = OmegaConf.select(cfg, key)
            assert (got is None) if value == "null" else str(got) == value
    if not sweep.startswith("smoke_"):
        # W&B run names: the overrides without the seed
        name = cfg.logger.wandb.name
        assert "seed" not in name and "sweep=" not in name
        assert name == ",".join(sorted(o for o in job if not o.startswith("seed=")))


def test_block_size_sweep_takes_the_gekf_limit_from_the_command_line(tmp_path):
    cfg = compose_cfg(
        "train", ["sweep=block_size", "optim=gekf", "optim.optimizer.block_size=null"], tmp_path
    )
    assert cfg.optim.name == "gekf" and cfg.optim.optimizer.block_size is None


@pytest.mark.parametrize("launcher", ["slurm", "parallel"])
def test_launcher_configs_compose_without_submitting(launcher, tmp_path):
    cfg = compose_cfg("train", ["sweep=block_size", f"hydra/launcher={launcher}"], tmp_path)
    lc = cfg.hydra.launcher
    if launcher == "slurm":
        assert lc._target_.endswith("submitit_launcher.SlurmLauncher")
        assert lc.gpus_per_node == 1 and lc.partition is None and lc.timeout_min > 0
        assert OmegaConf.to_container(lc)["submitit_folder"].startswith("${hydra.sweep.dir}")
    else:
        assert lc._target_.endswith("joblib_launcher.JoblibLauncher")
        assert lc.n_jobs >= 1
    # constructing the launcher only stores its parameters: nothing is submitted or spawned
    with mock.patch("subprocess.Popen") as popen:
        launcher_obj = hydra.utils.instantiate(lc)
    popen.assert_not_called()
    assert type(launcher_obj).__name__.endswith("Launcher")


def test_block_partition_callback_writes_csv_and_wandb_table(tmp_path):
    params = [torch.nn.Parameter(torch.zeros(30, 20)), torch.nn.Parameter(torch.zeros(20))]
    module = torch.nn.Module()
    module.w, module.b = params
    opt = RLEKF(params, block_size=256)
    wandb_logger = mock.MagicMock(spec=WandbLogger)
    wandb_logger.experiment.summary = {}
    trainer = SimpleNamespace(
        optimizers=[opt], loggers=[wandb_logger], default_root_dir=str(tmp_path)
    )
    BlockPartition().on_fit_start(trainer, module)
    with (tmp_path / "block_partition.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["numel"]) for r in rows] == opt.block_sizes
    assert rows[0]["segments"].startswith("w[0:")
    kwargs = wandb_logger.log_table.call_args.kwargs
    assert kwargs["key"] == "kf/block_partition"
    assert kwargs["data"] == partition_table(opt.blocks, ["w", "b"])
    assert wandb_logger.experiment.summary["kf/block_sizes"] == opt.block_sizes


def test_parity_figure_draws_both_panels(tmp_path):
    e = torch.linspace(-1, 1, 5).numpy()
    f = torch.linspace(-2, 2, 30).numpy()
    fig = parity_figure(e, e + 0.1, f, f, title="t")
    assert len(fig.axes) == 2
    assert "RMSE 0.1" in fig.axes[0].get_title()
    fig.savefig(tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


# ----------------------------------------------------------------------------- end to end
def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", WANDB_MODE="offline")
    env.setdefault("PYTHONPATH", str(ROOT / "src"))
    return env


def _val_curve(path: Path) -> list[dict[str, float]]:
    with path.open() as fh:
        reader = csv.DictReader(fh)
        for key in ("time/elapsed_s", "time/train_s", "time/epochs"):
            assert key in reader.fieldnames, f"EpochSummary must log {key}"
        rows = [r for r in reader if r.get("val/force_rmse")]
    return [
        {
            "epoch": int(r["epoch"]),
            "epochs": float(r["time/epochs"]),
            "force": float(r["val/force_rmse"]),
            "energy": float(r["val/energy_rmse"]),
            "time": float(r["time/train_s"]),
            "wall": float(r["time/elapsed_s"]),
        }
        for r in rows
    ]


def _stays(curve: list[dict[str, float]], key: str, target: float) -> dict[str, float] | None:
    """The first point after the last one above the target (None if the run ends above)."""
    above = [i for i, p in enumerate(curve) if not p[key] <= target]
    start = above[-1] + 1 if above else 0
    return curve[start] if start < len(curve) else None


def test_smoke_sweep_runs_and_report_matches_the_csv_logs(tmp_path, tmp_path_factory):
    sweep_dir = tmp_path / "multirun"
    cmd = [
        sys.executable,
        "-m",
        "rlekf.train",
        "sweep=smoke_optimizer_compare",
        "seed=0,1",  # a command-line value replaces the grid of that key: 2 x 2 jobs
        f"paths.log_dir={tmp_path / 'logs'}",
        f"paths.data_dir={tmp_path_factory.mktemp('sweep_data')}",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    jobs = sorted((p for p in sweep_dir.iterdir() if p.name.isdigit()), key=lambda p: p.name)
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    for job in jobs:
        assert (job / ".hydra" / "overrides.yaml").exists()
        assert (job / "parity_val.png").exists()
        # finished sweep runs keep only the weights-only checkpoint (no P)
        ckpts = {p.name for p in (job / "checkpoints").iterdir()}
        assert "last.ckpt" not in ckpts and any(n.startswith("best_weights") for n in ckpts)
    assert (jobs[0] / "block_partition.csv").exists()  # RLEKF jobs record their blocks

    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "rlekf.report", str(sweep_dir), "--out", str(out)],
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("runs.csv", "summary.csv", "summary.md", "curves.png", "summary.png"):
        assert (out / name).stat().st_size > 0, name
    assert "| optim=rlekf |" in (out / "summary.md").read_text()

    # recompute every number from the runs' own CSV logs
    curves = {job.name: _val_curve(job / "csv" / "metrics.csv") for job in jobs}
    target_f = 1.2 * min(p["force"] for c in curves.values() for p in c)
    target_e = 1.2 * min(p["energy"] for c in curves.values() for p in c)
    with (out / "runs.csv").open() as fh:
        runs = {r["job"]: r for r in csv.DictReader(fh)}
    expected_by_group: dict[str, list[dict[str, float]]] = {}
    for job, curve in curves.items():
        row = runs[job]
        first_f = [p for p in curve if p["force"] <= target_f]
        expected = {
            "final_force_rmse": curve[-1]["force"],
            "best_force_rmse": min(p["force"] for p in curve),
            "final_energy_rmse": curve[-1]["energy"],
            "best_energy_rmse": min(p["energy"] for p in curve),
            "epochs": curve[-1]["epochs"],
            "train_s": curve[-1]["time"],
            "elapsed_s": curve[-1]["wall"],
        }
        assert curve[-1]["time"] < curve[-1]["wall"]  # validation is outside the training clock
        if first_f:
            expected["first_epochs_to_target_force"] = first_f[0]["epochs"]
            expected["first_time_to_target_force_s"] = first_f[0]["time"]
        for q, target in (("force", target_f), ("energy", target_e)):
            hit = _stays(curve, q, target)
            if hit:
                expected[f"epochs_to_target_{q}"] = hit["epochs"]
                expected[f"time_to_target_{q}_s"] = hit["time"]
            else:
                assert row[f"time_to_target_{q}_s"] == ""
        for key, value in expected.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), (job, key)
        assert float(row["force_target"]) == pytest.approx(target_f, rel=1e-12)
        assert row["group"] == f"optim={row['optim']}"
        expected_by_group.setdefault(row["group"], []).append(expected)

    with (out / "summary.csv").open() as fh:
        summary = {r["group"]: r for r in csv.DictReader(fh)}
    assert set(summary) == {"optim=rlekf", "optim=adam"}
    for group, members in expected_by_group.items():
        assert int(summary[group]["n_runs"]) == 2
        for key in ("final_force_rmse", "best_force_rmse", "best_energy_rmse", "train_s"):
            values = [m[key] for m in members]
            assert float(summary[group][f"{key}_mean"]) == pytest.approx(
                statistics.fmean(values), rel=1e-12
            )
            assert float(summary[group][f"{key}_std"]) == pytest.approx(
                statistics.stdev(values), rel=1e-9, abs=1e-15
            )
    assert all(math.isfinite(float(r["elapsed_s"])) for r in runs.values())


def test_wandb_sweep_spec_proposals_compose(tmp_path):
    spec = yaml.safe_load((ROOT / "scripts" / "wandb_sweep.yaml").read_text())
    assert spec["program"] == "rlekf-train"
    assert "${args_no_hyphens}" in spec["command"]
    assert spec["metric"]["name"] == "val/force_rmse"
    fixed = [c for c in spec["command"] if "=" in c and not c.startswith(("$", "WANDB_"))]
    proposal = [
        f"{k}={p['values'][0] if 'values' in p else p['min']}"
        for k, p in spec["parameters"].items()
    ]
    cfg = compose_cfg("train", [*fixed, *proposal], tmp_path)
    assert (
        cfg.optim.optimizer.block_size
        == spec["parameters"]["optim.optimizer.block_size"]["values"][0]
    )
    assert "csv" in cfg.logger and "wandb" in cfg.logger
