"""rlekf-bench: target/ratio bookkeeping, report files, and one tiny end-to-end comparison."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from rlekf.bench import (
    RunResult,
    adam_epochs_for_budget,
    device_overrides,
    epochs_to_target,
    machine_name,
    max_epochs_of,
    microbench,
    parse_adam_epochs,
    resolve_device,
    run_training,
    summarize,
    with_max_epochs,
    write_report,
)
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


def test_parse_adam_epochs():
    assert parse_adam_epochs("auto") == "auto"
    assert parse_adam_epochs("Preset") == "preset"
    assert parse_adam_epochs("40") == 40
    for bad in ("0", "-3", "many", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_adam_epochs(bad)


def test_adam_epochs_for_budget_excludes_the_first_epoch():
    # first epoch 10 s (8 s of warm-up on top of the 2 s rate), then 2 s per epoch
    n, spe = adam_epochs_for_budget([10.0, 12.0, 14.0], budget_s=100)
    assert spe == pytest.approx(2.0)
    assert n == int(0.9 * (100 - 8) / 2)  # 41: the whole schedule ends inside the budget
    assert 8 + n * spe <= 100
    assert adam_epochs_for_budget([1.0, 2.0], budget_s=100, safety=1.0) == (100, 1.0)
    assert adam_epochs_for_budget([50.0, 90.0], budget_s=60)[0] == 1  # at least one epoch
    with pytest.raises(ValueError):
        adam_epochs_for_budget([3.0], budget_s=100)
    with pytest.raises(ValueError):
        adam_epochs_for_budget([3.0, 3.0], budget_s=100)


def test_max_epochs_overrides():
    over = ["trainer=gpu", "trainer.max_epochs=16", "data.batch_size=1"]
    assert max_epochs_of(over) == 16 and max_epochs_of(["data.batch_size=1"]) is None
    new = with_max_epochs(over, 120)
    assert new == ["trainer=gpu", "data.batch_size=1", "trainer.max_epochs=120"]
    assert max_epochs_of(new) == 120
    assert with_max_epochs([], 3) == ["trainer.max_epochs=3"]


def test_device_overrides_and_resolution():
    assert device_overrides(torch.device("cuda"), []) == ["trainer=gpu"]
    assert device_overrides(torch.device("cpu"), ["model=small"]) == ["trainer=cpu"]
    assert device_overrides(torch.device("cuda"), ["trainer=ddp"]) == []
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "torch" in machine_name("cpu")


def test_microbench_rank_1_and_rank_k_columns_on_cpu():
    rows = microbench([256], repeats=1, device="cpu", k=2)
    assert [r["model"] for r in rows] == ["Cu", "H2O"]
    for r in rows:
        assert r["device"] == "cpu" and r["p_dtype"] == "float64" and r["rankk_k"] == 2
        assert r["gb_moved"] == pytest.approx(3 * r["p_gib"] * 2**30 / 1e9)  # 24·Σn² bytes
        assert r["ms_per_update"] > 0 and r["rankk_ms_per_update"] > 0
        assert r["rankk_ms_per_measurement"] == pytest.approx(r["rankk_ms_per_update"] / 2)
        assert "peak_gpu_mib" not in r


def test_report_with_rank_k_gpu_columns_tag_and_notes(tmp_path):
    runs = [_run("adam", [1.0, 0.5], [0.1, 0.05], 1.0), _run("rlekf", [0.4, 0.3], [0.05, 0.04], 2)]
    runs[0].peak_gpu_mib = runs[1].peak_gpu_mib = 321.0
    runs[0].max_epochs = 40
    micro = [
        {
            "model": "Cu",
            "block_size": 5120,
            "n_blocks": 7,
            "p_gib": 0.86,
            "ms_per_update": 0.95,
            "gb_moved": 2.8,
            "achieved_gbs": 2900.0,
            "bound_gbs": 3000.0,
            "achieved_over_bound": 0.97,
            "device": "cuda",
            "p_dtype": "float32",
            "rankk_k": 5,
            "rankk_ms_per_update": 1.2,
            "rankk_ms_per_measurement": 0.24,
            "rankk_achieved_gbs": 2300.0,
            "rankk_achieved_over_bound": 0.77,
            "rankk_speedup_per_measurement": 3.96,
            "peak_gpu_mib": 1000.0,
        }
    ]
    rows = summarize(runs)
    assert rows[0]["adam_max_epochs"] == 40 and rows[0]["rlekf_peak_gpu_mib"] == 321.0
    md = write_report(
        tmp_path, "cu", 10, runs, rows, micro, tag="h100", notes=["- cu: Adam max_epochs = 40"]
    )
    assert md.name.endswith("-h100-cu.md")
    text = md.read_text()
    assert "peak GPU MiB Adam / RLEKF" in text and "| 321 / 321 |" in text
    assert "- cu: Adam max_epochs = 40" in text
    assert "rank-5 ms/update" in text
    assert "| Cu | 5120 | 7 | 0.860 | 0.95 |" in text and "| float32 | 1.2 | 0.24 |" in text
    # microbenchmark only: no training files
    md2 = write_report(tmp_path / "m", "micro", 10, [], [], micro, tag="h100")
    assert sorted(p.name.split("h100-")[1] for p in md2.parent.iterdir()) == [
        "micro.csv",
        "micro.md",
    ]


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


def test_several_seeds_give_one_row_per_data_set_and_seed(tmp_path, monkeypatch):
    import rlekf.bench as bench

    calls = []

    def fake_run(ds, optim, overrides, budget, out, seed=0):
        calls.append((ds, optim, seed, tuple(overrides), out))
        good = 0.5 if optim == "adam" else 0.2 + 0.1 * seed  # seed changes the Kalman result
        return _run(optim, [1.0, good], [0.1, good / 10], dt=1.0)

    monkeypatch.setattr(bench, "run_training", fake_run)
    bench.main(
        [
            "--preset", "cu", "--seeds", "0", "1", "--optims", "rlekf", "adam",
            "--adam-epochs", "7", "--no-micro", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), "--tag", "t",
        ]
    )  # fmt: skip
    assert [(c[1], c[2]) for c in calls] == [("rlekf", 0), ("adam", 0), ("rlekf", 1), ("adam", 1)]
    assert len({c[4] for c in calls}) == 4  # separate run folders
    assert all("trainer.max_epochs=7" in c[3] for c in calls if c[1] == "adam")
    rows = list(csv.DictReader(open(next((tmp_path / "out").glob("*.csv")))))
    assert [r["dataset"] for r in rows] == ["cu_pwmat seed 0", "cu_pwmat seed 1"]
    assert [float(r["rlekf_best_force"]) for r in rows] == pytest.approx([0.2, 0.3])
    md = next((tmp_path / "out").glob("*.md")).read_text()
    assert md.count("Adam max_epochs = 7") == 1
