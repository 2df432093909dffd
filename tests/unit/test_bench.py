"""rlekf-bench: target/ratio bookkeeping, report files, and one tiny end-to-end comparison."""

from __future__ import annotations

import csv

import pytest

from rlekf.bench import RunResult, epochs_to_target, run_training, summarize, write_report
from tests.helpers.hydra import FAST_DATA


def _run(optim, force, energy, dt):
    n = len(force)
    return RunResult(
        "cu",
        optim,
        list(range(1, n + 1)),
        [dt * (k + 1) for k in range(n)],
        energy,
        force,
        peak_rss_mib=100.0,
    )


def test_epochs_to_target():
    assert epochs_to_target([3.0, 2.0, 1.0], [1.0, 2.0, 3.0], 2.0) == (2, 2.0)
    assert epochs_to_target([3.0, 2.5], [1.0, 2.0], 1.0) == (None, None)


def test_summarize_uses_the_best_of_either_optimizer():
    adam = _run("adam", [1.0, 0.5, 0.2, 0.1], [0.1, 0.05, 0.02, 0.012], dt=1.0)
    rlekf = _run("rlekf", [0.9, 0.11, 0.1], [0.02, 0.01, 0.009], dt=5.0)
    (row,) = summarize([adam, rlekf])
    assert row["force_target"] == pytest.approx(0.12)
    assert row["adam_force_epochs"] == 4 and row["rlekf_force_epochs"] == 2
    assert row["force_epoch_ratio"] == pytest.approx(2.0)
    assert row["force_time_ratio"] == pytest.approx(4.0 / 10.0)
    assert row["energy_target"] == pytest.approx(1.2 * 0.009)
    assert row["adam_energy_epochs"] is None and row["energy_epoch_ratio"] == ">=2"
    assert row["energy_time_ratio"] == f">={4.0 / 10.0:.3g}"


def test_report_files(tmp_path):
    runs = [_run("adam", [1.0, 0.5], [0.1, 0.05], 1.0), _run("rlekf", [0.4, 0.3], [0.05, 0.04], 2)]
    micro = [
        {
            "model": "Cu",
            "block_size": 5120,
            "n_blocks": 7,
            "p_gib": 0.86,
            "ms_per_update": 76.0,
            "gb_moved": 2.8,
            "achieved_gbs": 36.0,
            "bound_gbs": 20.0,
            "achieved_over_bound": 1.8,
        }
    ]
    md = write_report(tmp_path, "quick", 10, runs, summarize(runs), micro)
    text = md.read_text()
    assert "| cu (rlekf) |" in text and "| Cu | 5120 | 7 |" in text
    assert md.with_name(md.stem + "-curves.png").exists()
    with open(md.with_suffix(".csv")) as fh:
        assert next(csv.DictReader(fh))["dataset"] == "cu"


def test_tiny_end_to_end_training_run(tmp_path):
    overrides = [
        "model=small",
        "optim.optimizer.block_size=512",
        *FAST_DATA,
        f"paths.data_dir={tmp_path / 'data'}",
    ]
    r = run_training("cu_emt", "rlekf", overrides, budget_s=4, out=tmp_path / "run")
    assert r.returncode == 0, (tmp_path / "run" / "bench_stdout.log").read_text()[-2000:]
    assert r.epochs and r.epochs == sorted(r.epochs) and r.peak_rss_mib > 0
    assert r.elapsed_s == sorted(r.elapsed_s)
