"""rlekf-bench: target/ratio bookkeeping, report files, and one tiny end-to-end comparison."""

from __future__ import annotations

import argparse
import csv
import math
import os
import time

import pytest
import torch

from rlekf.bench import (
    RunResult,
    adam_epochs_for_budget,
    device_overrides,
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
from rlekf.runs import read_metrics_csv
from tests.helpers.hydra import FAST_DATA


def _write_metrics(path, points):
    """A metrics.csv as Lightning's CSVLogger writes it with EpochSummary's clocks: per point
    ``(epochs done, train s, val s so far, energy RMSE, force RMSE)``; step rows between."""
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = ["epoch", "step", "train/loss", "time/elapsed_s", "time/epochs", "time/train_s"]
    cols += ["time/val_s", "val/energy_rmse", "val/force_rmse"]
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols)
        for k, (ep, train_s, val_s, e, f) in enumerate(points):
            epoch = int(math.ceil(ep)) - 1  # Lightning's 0-based index of a (partial) epoch
            w.writerow([epoch, 10 * k + 9, 0.5, "", "", "", "", "", ""])
            w.writerow([epoch, 10 * k + 9, "", train_s + val_s, ep, train_s, val_s, e, f])
    return path


def _run(tmp_path, optim, force, energy, dt, *, seed=0, val_dt=0.0, last_fraction=None):
    """A run whose curve went through a metrics.csv: epoch k ends at k·dt training seconds
    (``val_dt`` of validation per epoch on the wall-clock); ``last_fraction`` cuts the last
    epoch to that fraction (training time in proportion)."""
    n = len(force)
    epochs = [float(k + 1) for k in range(n)]
    if last_fraction is not None:
        epochs[-1] = n - 1 + last_fraction
    points = [
        (ep, dt * ep, val_dt * (k + 1), e, f)
        for k, (ep, e, f) in enumerate(zip(epochs, energy, force, strict=True))
    ]
    path = _write_metrics(tmp_path / f"{optim}-{seed}-{len(list(tmp_path.iterdir()))}.csv", points)
    curve, _ = read_metrics_csv(path)
    return RunResult("cu", optim, curve, seed=seed, peak_rss_mib=100.0)


def test_summarize_uses_the_best_of_either_optimizer_and_training_time(tmp_path):
    # validation costs 10 s per epoch on the wall-clock: the ratios must not see it
    adam = _run(tmp_path, "adam", [1.0, 0.5, 0.2, 0.1], [0.1, 0.05, 0.02, 0.012], 1.0, val_dt=10)
    rlekf = _run(tmp_path, "rlekf", [0.9, 0.11, 0.1], [0.02, 0.01, 0.009], 5.0, val_dt=10)
    (row,) = summarize([adam, rlekf])
    assert row["kalman"] == "rlekf" and row["seeds"] == 1 and row["clock"] == "train"
    assert row["force_target"] == pytest.approx(0.12)
    assert row["force_stay_adam_epochs"] == 4 and row["force_stay_kal_epochs"] == 2
    assert row["force_stay_epoch_ratio"].value == pytest.approx(2.0)
    assert row["force_stay_epoch_ratio"].bound == "="
    # training seconds 4 (Adam) and 10 (RLEKF), not the wall-clock 44 and 30
    assert row["force_stay_adam_s"] == 4.0 and row["force_stay_kal_s"] == 10.0
    assert row["force_stay_time_ratio"].value == pytest.approx(0.4)
    assert row["adam_s_per_epoch"] == 1.0 and row["kal_s_per_epoch"] == 5.0
    # Adam never reaches the energy target 1.2 x 0.009: a lower bound from its whole run
    assert row["energy_target"] == pytest.approx(1.2 * 0.009)
    assert row["energy_stay_adam_epochs_n"] == 0
    e = row["energy_stay_epoch_ratio"]
    assert e.bound == ">=" and e.value == pytest.approx(4 / 2) and str(e) == "≥ 2×"
    assert row["energy_stay_time_ratio"].value == pytest.approx(4.0 / 10.0)


def test_stays_below_is_primary_and_first_crossing_secondary(tmp_path):
    # Adam's energy dips below the target once at epoch 2 (a lucky epoch), stays from epoch 5
    adam = _run(tmp_path, "adam", [1.0] * 6, [0.5, 0.10, 0.4, 0.3, 0.11, 0.10], 1.0)  # target 0.12
    rlekf = _run(tmp_path, "rlekf", [1.0] * 3, [0.3, 0.11, 0.115], 4.0)
    (row,) = summarize([adam, rlekf])
    assert row["energy_target"] == pytest.approx(0.12)
    assert row["energy_first_adam_epochs"] == 2 and row["energy_stay_adam_epochs"] == 5
    assert row["energy_stay_kal_epochs"] == 2 and row["energy_first_kal_epochs"] == 2
    assert row["energy_stay_epoch_ratio"].value == pytest.approx(5 / 2)
    assert row["energy_first_epoch_ratio"].value == pytest.approx(2 / 2)
    assert row["energy_stay_time_ratio"].value == pytest.approx(5.0 / 8.0)


def test_a_truncated_last_epoch_counts_as_its_fraction(tmp_path):
    # RLEKF's third epoch is cut at 40 % by the budget and first reaches the target there
    adam = _run(tmp_path, "adam", [1.0, 0.5, 0.3, 0.2, 0.12], [1.0] * 5, 1.0)
    rlekf = _run(tmp_path, "rlekf", [0.5, 0.3, 0.1], [1.0] * 3, 10.0, last_fraction=0.4)
    (row,) = summarize([adam, rlekf])
    assert row["force_target"] == pytest.approx(0.12)
    assert row["force_stay_kal_epochs"] == pytest.approx(2.4)  # not 3
    assert row["force_stay_kal_s"] == pytest.approx(24.0)
    assert row["kal_epochs_run"] == pytest.approx(2.4)
    assert row["kal_s_per_epoch"] == pytest.approx(10.0)  # from the 2 whole epochs only
    assert row["force_stay_epoch_ratio"].value == pytest.approx(5 / 2.4)


def test_rlekf_missing_a_target_adam_reaches_gives_an_upper_bound(tmp_path):
    adam = _run(tmp_path, "adam", [1.0, 0.5, 0.2, 0.1], [1.0] * 4, 1.0)
    rlekf = _run(tmp_path, "rlekf", [0.9, 0.5, 0.3], [1.0] * 3, 5.0)
    (row,) = summarize([adam, rlekf])
    assert row["force_stay_kal_epochs_n"] == 0 and row["force_stay_adam_epochs"] == 4
    r = row["force_stay_epoch_ratio"]
    # RLEKF needs more than the 3 epochs it ran: Adam / RLEKF <= 4 / 3
    assert r.bound == "<=" and r.value == pytest.approx(4 / 3) and str(r) == "≤ 1.33×"
    assert row["force_stay_time_ratio"].value == pytest.approx(4.0 / 15.0)
    md = write_report(tmp_path / "out", "cu", 10, [adam, rlekf], [row], [])
    text = md.read_text()
    assert (
        "4 / never (ran 3 epochs) (≤ 1.33×)" in text and "4 / never (ran 15 s) (≤ 0.267×)" in text
    )


def test_report_lists_each_run_with_its_load_average(tmp_path):
    adam = _run(tmp_path, "adam", [1.0, 0.5], [1.0] * 2, 1.0)
    rlekf = _run(tmp_path, "rlekf", [0.9, 0.3], [1.0] * 2, 5.0)
    adam.load_before, adam.load_after, adam.wall_s = 0.25, 2.5, 123.4
    rlekf.other_cpu_s = 3.31
    rlekf.returncode = 1
    text = write_report(tmp_path / "out", "cu", 10, [adam, rlekf], summarize([adam, rlekf]), [])
    text = text.read_text()
    assert "| cu | adam | 0 | 123 | 0.25 / 2.50 | nan | 0 |" in text
    assert "| cu | rlekf | 0 | nan | nan / nan | 3.3 | 1 |" in text  # NaN: not measured


def test_seeds_mean_std_and_ratio_of_means(tmp_path):
    import statistics

    adam_epochs, kal_epochs = [4, 6, 5], [1, 2, 2]
    runs = []
    for seed, (na, nk) in enumerate(zip(adam_epochs, kal_epochs, strict=True)):
        # reaches 0.1 (the best) at epoch na / nk and stays there
        runs.append(
            _run(tmp_path, "adam", [1.0] * (na - 1) + [0.1] * 2, [1.0] * (na + 1), 1.0, seed=seed)
        )
        runs.append(
            _run(tmp_path, "rlekf", [1.0] * (nk - 1) + [0.1] * 2, [1.0] * (nk + 1), 3.0, seed=seed)
        )
    (row,) = summarize(runs)
    assert row["seeds"] == 3
    assert row["force_stay_adam_epochs"] == pytest.approx(statistics.fmean(adam_epochs))
    assert row["force_stay_adam_epochs_std"] == pytest.approx(statistics.stdev(adam_epochs))
    assert row["force_stay_kal_epochs_std"] == pytest.approx(statistics.stdev(kal_epochs))
    r = row["force_stay_epoch_ratio"]
    ma, mk = statistics.fmean(adam_epochs), statistics.fmean(kal_epochs)
    assert r.bound == "=" and r.value == pytest.approx(ma / mk)
    rel = (statistics.stdev(adam_epochs) / ma) ** 2 + (statistics.stdev(kal_epochs) / mk) ** 2
    assert r.spread == pytest.approx(ma / mk * rel**0.5)
    assert row["force_stay_time_ratio"].value == pytest.approx(ma / (3 * mk))


def test_report_files(tmp_path):
    runs = [
        _run(tmp_path, "adam", [1.0, 0.5], [0.1, 0.05], 1.0),
        _run(tmp_path, "rlekf", [0.4, 0.3], [0.05, 0.04], 2),
    ]
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
    md = write_report(tmp_path / "out", "quick", 10, runs, summarize(runs), micro)
    text = md.read_text()
    assert "| cu (rlekf) | 1 |" in text and "| Cu | 5120 | 7 |" in text
    assert md.with_name(md.stem + "-curves.png").exists()
    with open(md.with_suffix(".csv")) as fh:
        row = next(csv.DictReader(fh))
    assert row["dataset"] == "cu" and row["force_stay_epoch_ratio"] == "≥ 1×"


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
    rows = microbench([256], repeats=1, device="cpu", k=2, p_dtypes=("float64",))
    assert [r["model"] for r in rows] == ["Cu", "H2O"]
    for r in rows:
        assert r["device"] == "cpu" and r["p_dtype"] == "float64" and r["rankk_k"] == 2
        # one read + one write of the stored triangle
        assert r["gb_moved"] == pytest.approx(2 * r["p_gib"] * 2**30 / 1e9)
        assert r["full_ms_per_update"] > 0 and r["speedup_vs_full"] > 0
        assert r["ms_per_update"] > 0 and r["rankk_ms_per_update"] > 0
        assert r["rankk_ms_per_measurement"] == pytest.approx(r["rankk_ms_per_update"] / 2)
        assert "peak_gpu_mib" not in r


def test_report_with_rank_k_gpu_columns_tag_and_notes(tmp_path):
    runs = [
        _run(tmp_path, "adam", [1.0, 0.5], [0.1, 0.05], 1.0),
        _run(tmp_path, "rlekf", [0.4, 0.3], [0.05, 0.04], 2),
    ]
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
    assert rows[0]["adam_max_epochs"] == 40 and rows[0]["kal_peak_gpu_mib"] == 321.0
    md = write_report(
        tmp_path / "out",
        "cu",
        10,
        runs,
        rows,
        micro,
        tag="h100",
        notes=["- cu: Adam max_epochs = 40"],
    )
    assert md.name.endswith("-h100-cu.md")
    text = md.read_text()
    assert "peak GPU MiB Adam / Kalman" in text and "| 321 / 321 |" in text
    assert "- cu: Adam max_epochs = 40" in text
    assert "rank-5 ms/update" in text
    assert "| Cu | 5120 | 7 | 0.860 | 0.95 |" in text and "| float32 | 1.2 | 0.24 |" in text
    # microbenchmark only: no training files
    md2 = write_report(tmp_path / "m", "micro", 10, [], [], micro, tag="h100")
    assert sorted(p.name.split("h100-")[1] for p in md2.parent.iterdir()) == [
        "micro.csv",
        "micro.md",
    ]


@pytest.mark.slow  # 20 s: the rlekf-bench training path end to end (make test-full)
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
    # EpochSummary's training clock: logged, increasing, below the wall-clock (validation
    # and checkpoint writes are outside it)
    assert all(p.clock == "train" for p in r.curve)
    assert r.train_s == sorted(r.train_s)
    assert all(0 < p.train_s < p.time_s for p in r.curve)
    # the budget is on training time: the run trained 4 s and stopped after the batch that
    # crossed it, so it overshoots by less than one batch, hence less than the longest stretch
    # of training between two validations (no wall-clock constant: a loaded machine only
    # stretches both sides)
    stretches = [b - a for a, b in zip([0.0, *r.train_s[:-1]], r.train_s, strict=True)]
    assert 4.0 <= r.train_s[-1] < 4.0 + max(stretches)
    assert math.isfinite(r.other_cpu_s) and r.other_cpu_s < r.wall_s * os.cpu_count()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc/stat")
def test_busy_cpu_counts_this_process():
    from rlekf.bench import busy_cpu_s

    before, cpu0 = busy_cpu_s(), time.process_time()
    while time.process_time() - cpu0 < 0.3:  # 0.3 s of this process's CPU time
        pass
    # the machine's busy time grew by at least what this process used (others only add)
    assert busy_cpu_s() - before >= 0.3 - 0.05


def test_several_seeds_give_one_row_per_data_set_with_mean_and_calibration_error(
    tmp_path, monkeypatch
):
    import rlekf.bench as bench

    calls = []

    def fake_run(ds, optim, overrides, budget, out, seed=0, data=None, clock="train"):
        calls.append((ds, optim, seed, tuple(overrides), out, data))
        out.mkdir(parents=True, exist_ok=True)
        good = 0.5 if optim == "adam" else 0.2 + 0.1 * seed  # seed changes the Kalman result
        r = _run(out, optim, [1.0, good], [0.1, good / 10], 1.0, seed=seed)
        r.max_epochs = bench.max_epochs_of(list(overrides))
        r.dataset = ds
        return r

    monkeypatch.setattr(bench, "run_training", fake_run)
    rc = bench.main(
        [
            "--preset", "cu", "--seeds", "0", "1", "--optims", "rlekf", "adam",
            "--adam-epochs", "7", "--no-micro", "--device", "cpu",
            "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"), "--tag", "t",
        ]
    )  # fmt: skip
    assert rc == 0
    assert [(c[1], c[2]) for c in calls] == [("rlekf", 0), ("adam", 0), ("rlekf", 1), ("adam", 1)]
    assert len({c[4] for c in calls}) == 4  # separate run folders
    assert {c[5] for c in calls} == {"cu_pwmat"}
    assert all("trainer.max_epochs=7" in c[3] for c in calls if c[1] == "adam")
    rows = list(csv.DictReader(open(next((tmp_path / "out").glob("*.csv")))))
    assert [r["dataset"] for r in rows] == ["cu_pwmat"] and rows[0]["seeds"] == "2"
    assert float(rows[0]["kal_best_force"]) == pytest.approx(0.25)  # mean of 0.2 and 0.3
    md = next((tmp_path / "out").glob("*.md")).read_text()
    assert md.count("Adam max_epochs = 7") == 1
    # Adam planned 7 epochs and ran 2: the plan's error is reported for each seed
    assert md.count("Adam ran 2 of its 7 planned epochs (plan error -71 %") == 2
    # ... and how much of the budget its schedule used (2 epochs of 1 s of training each)
    assert md.count("in 2 s of the 480 s budget (0 %, training time)") == 2


def test_adam_plan_note_says_how_much_of_the_budget_the_schedule_used(tmp_path):
    from rlekf.bench import adam_plan_note

    # 4 epochs of 100 s of training and 50 s of validation each: 400 s of a 500 s budget
    run = _run(tmp_path, "adam", [0.4, 0.3, 0.2, 0.1], [0.1] * 4, 100.0, val_dt=50.0)
    run.max_epochs = 4
    note = adam_plan_note("si", 1, run, 500, "train")
    assert note == (
        "- si seed 1: Adam ran 4 of its 4 planned epochs (plan error +0 %) in 400 s of the "
        "500 s budget (80 %, training time)."
    )
    run.max_epochs = 8
    wall = adam_plan_note("si", 1, run, 500, "wall")
    assert "(plan error -50 %; its lr schedule did not reach its end)" in wall
    assert wall.endswith("in 600 s of the 500 s budget (120 %, wall-clock).")


@pytest.mark.parametrize("clock", [None, "train", "wall"])
def test_adam_epochs_default_to_auto_on_cpu(tmp_path, monkeypatch, clock):
    import rlekf.bench as bench

    calls = []

    def fake_run(ds, optim, overrides, budget, out, seed=0, data=None, clock="train"):
        calls.append((optim, tuple(overrides), clock))
        out.mkdir(parents=True, exist_ok=True)
        # calibration (cut at 3 epochs here): epochs of 2 s of training each (1, 3, 5 s at
        # their ends) and a validation of 1, 2, 3 s after each: wall-clock 2, 6, 11 s
        n = bench.max_epochs_of(list(overrides)) or 3
        pts = [(k + 1.0, 1.0 + 2 * k, (k + 1) * (k + 2) / 2, 1.0, 1.0) for k in range(min(n, 3))]
        curve = read_metrics_csv(_write_metrics(out / "m.csv", pts))[0]
        return RunResult(ds, optim, curve, seed=seed, max_epochs=n)

    monkeypatch.setattr(bench, "run_training", fake_run)
    rc = bench.main(
        [
            "--preset", "cu", "--budget", "100", "--seeds", "0", "--optims", "adam",
            "--no-micro", "--device", "cpu", "--out", str(tmp_path / "out"),
            "--work", str(tmp_path / "w"), *(["--clock", clock] if clock else []),
        ]
    )  # fmt: skip
    assert rc == 0
    (calib, real) = calls
    assert "trainer.max_epochs=5" in calib[1]  # the calibration run's epochs
    assert calib[2] == real[2] == (clock or "train")
    md = next((tmp_path / "out").glob("*.md")).read_text()
    if clock == "wall":
        # wall-clock 2, 6, 11 s: (11 - 2) / 2 = 4.5 s/epoch, no first-epoch overhead
        # ... and the plan fills 90 % of a wall-clock budget
        assert f"trainer.max_epochs={int(0.9 * 100 / 4.5)}" in real[1]
        assert "Budget 100 s of wall-clock per run" in md
    else:
        # training time 1, 3, 5 s at the 3 epoch ends: 2 s/epoch, no first-epoch overhead;
        # the plan fills 95 % of a training-time budget (47 epochs, not 0.9's 45)
        assert f"trainer.max_epochs={int(0.95 * 100 / 2)}" in real[1]
        assert "Budget 100 s of training time per run" in md


def test_presets_are_read_from_configs_bench_and_name_real_data_presets(tmp_path) -> None:
    from rlekf.bench import PRESETS, load_presets
    from tests.helpers.hydra import CONFIG_DIR

    assert {"quick", "cu", "full", "batch"} <= set(PRESETS)
    data = {p.stem for p in (CONFIG_DIR / "data").glob("*.yaml")}
    for preset in PRESETS.values():
        assert preset["budget_s"] > 0 and preset["micro_blocks"]
        assert {row["data"] for row in preset["datasets"].values()} <= data
    assert PRESETS["full"]["datasets"]["si_mlearn"]["data"] == "si_mlearn"
    rows = PRESETS["batch"]["datasets"]
    assert {r["data"] for r in rows.values()} == {"cu_pwmat"}
    assert [r["all"] for r in rows.values()] == [[f"data.batch_size={b}"] for b in (1, 4, 16)]
    bad = tmp_path / "broken.yaml"
    bad.write_text("budget_s: 10\ndatasets: {}\n")
    with pytest.raises(ValueError, match="broken.yaml"):
        load_presets(tmp_path)


def _fake_training(monkeypatch) -> list:
    """Replace ``rlekf.bench.run_training`` by a stub that records each call (``ds``, ``optim``,
    ``data``, ``overrides``) and returns a two-epoch curve; returns the list of calls."""
    from types import SimpleNamespace

    import rlekf.bench as bench

    calls = []

    def fake_run(ds, optim, overrides, budget, out, seed=0, data=None, clock="train"):
        calls.append(SimpleNamespace(ds=ds, optim=optim, data=data, overrides=tuple(overrides)))
        out.mkdir(parents=True, exist_ok=True)
        r = _run(out, optim, [1.0, 0.5], [0.1, 0.05], 1.0, seed=seed)
        r.dataset = ds
        return r

    monkeypatch.setattr(bench, "run_training", fake_run)
    return calls


def test_batch_preset_runs_one_data_preset_in_rows_per_batch_size(tmp_path, monkeypatch):
    import rlekf.bench as bench

    calls = _fake_training(monkeypatch)
    rc = bench.main(
        [
            "--preset", "batch", "--seeds", "0", "--optims", "rlekf", "--no-micro",
            "--device", "cpu", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "w"),
        ]
    )  # fmt: skip
    assert rc == 0
    assert [(c.ds, c.data) for c in calls] == [(f"cu_pwmat_bs{b}", "cu_pwmat") for b in (1, 4, 16)]
    assert [c.overrides[-1] for c in calls] == [f"data.batch_size={b}" for b in (1, 4, 16)]
    rows = list(csv.DictReader(open(next((tmp_path / "out").glob("*.csv")))))
    assert [r["dataset"] for r in rows] == [f"cu_pwmat_bs{b}" for b in (1, 4, 16)]


def test_run_training_lets_the_budget_cut_the_first_epoch(tmp_path, monkeypatch):
    """min_epochs=0: Lightning's max_time stops a run inside its first epoch (the trainer
    default min_epochs=1 would run the whole epoch past the budget)."""
    import subprocess

    import rlekf.bench as bench

    seen = {}

    def fake(cmd, **kw):
        seen["code"] = cmd[-1]
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.subprocess, "run", fake)
    bench.run_training("cu_emt", "rlekf", ["trainer=cpu"], 30, tmp_path / "r", clock="wall")
    code = seen["code"]
    assert "'trainer.min_epochs=0'" in code and "'+trainer.max_time=00:00:00:30'" in code
    assert "max_train_s" not in code
    assert code.index("'trainer.min_epochs=0'") < code.index("'trainer=cpu'")  # overridable
    # the default: the budget is on training time, under a wall-clock cap of 3 x 30 + 600 s
    bench.run_training("cu_emt", "rlekf", ["trainer=cpu"], 30, tmp_path / "r")
    code = seen["code"]
    assert "'callbacks.epoch_summary.max_train_s=30'" in code
    assert "'+trainer.max_time=00:00:11:30'" in code and "'trainer.min_epochs=0'" in code
    with pytest.raises(ValueError, match="clock"):
        bench.budget_overrides(30, "cpu")


def test_fixed_targets_give_their_own_columns_bounds_and_table(tmp_path):
    """An absolute target set before the runs: reached by Adam at epoch 3 (stays), by RLEKF
    only in a lucky dip (first crossing at 1, never staying): an upper bound."""
    adam = _run(tmp_path, "adam", [1.0, 0.5, 0.04, 0.03], [1.0] * 4, 1.0)
    rlekf = _run(tmp_path, "rlekf", [0.04, 0.3, 0.2], [1.0] * 3, 5.0)
    (row,) = summarize([adam, rlekf], {"cu": {"force": 0.05}})
    assert row["force_fixed_target"] == 0.05 and "energy_fixed_target" not in row
    assert row["force_fixed_stay_adam_epochs"] == 3 and row["force_fixed_stay_kal_epochs_n"] == 0
    r = row["force_fixed_stay_epoch_ratio"]
    assert r.bound == "<=" and r.value == pytest.approx(3 / 3)
    first = row["force_fixed_first_epoch_ratio"]  # RLEKF's dip at epoch 1 counts as a crossing
    assert first.bound == "=" and first.value == pytest.approx(3.0)
    # the relative target (1.2 x best = 0.036) is independent of the fixed one
    assert row["force_target"] == pytest.approx(1.2 * 0.03)
    text = write_report(tmp_path / "out", "cu", 10, [adam, rlekf], [row], []).read_text()
    assert "Absolute targets fixed before the runs" in text
    assert "| cu (rlekf) | force | 0.05 eV/Å | 3 / never (ran 3 epochs) (≤ 1×) |" in text
    assert (
        summarize([adam, rlekf])[0].keys()
        == {k: v for k, v in row.items() if "fixed" not in k}.keys()
    )


def test_preset_targets_are_validated(tmp_path):
    from rlekf.bench import PRESETS, load_presets

    assert PRESETS["full"]["datasets"]["si_mlearn"]["targets"] == {
        "force": 0.06,
        "energy": 2.21e-3,
    }
    assert PRESETS["quick"]["datasets"]["cu_emt"]["targets"] == {}
    for bad in ("{force: -1}", "{forces: 0.1}", "{energy: abc}"):
        (tmp_path / "p.yaml").write_text(
            f"budget_s: 10\nmicro_blocks: [8]\ndatasets:\n  cu_emt:\n    targets: {bad}\n"
        )
        with pytest.raises(ValueError, match=r"p.yaml: datasets.cu_emt.*targets"):
            load_presets(tmp_path)


def test_clock_s_picks_the_budget_clock_and_the_report_defaults_to_training_time(tmp_path):
    # 2 s of training and 10 s of validation per epoch: the two clocks differ
    run = _run(tmp_path, "adam", [1.0, 0.5, 0.2], [0.1, 0.05, 0.02], 2.0, val_dt=10)
    assert run.clock_s("train") == [2.0, 4.0, 6.0]
    assert run.clock_s("wall") == [12.0, 24.0, 36.0]
    with pytest.raises(ValueError, match="clock"):
        run.clock_s("cpu")
    rlekf = _run(tmp_path, "rlekf", [0.9, 0.1, 0.09], [0.02, 0.01, 0.009], 5.0)
    rows = summarize([run, rlekf])
    text = write_report(tmp_path / "out", "cu", 10, [run, rlekf], rows, []).read_text()
    assert "Budget 10 s of training time per run" in text
    wall = write_report(tmp_path / "w", "cu", 10, [run, rlekf], rows, [], budget_clock="wall")
    assert "Budget 10 s of wall-clock per run" in wall.read_text()


def test_an_unpaired_data_set_says_why_it_has_no_ratio(tmp_path):
    kalman_only = [
        _run(tmp_path, "rlekf", [0.9, 0.1], [0.02, 0.01], 5.0),
        _run(tmp_path, "rlekf_fused", [0.8, 0.2], [0.03, 0.01], 4.0),
    ]
    (row,) = summarize(kalman_only)
    assert row["note"] == "no Adam run to pair with (ran: rlekf, rlekf_fused)"
    (row,) = summarize([_run(tmp_path, "adam", [0.9, 0.1], [0.02, 0.01], 5.0)])
    assert row["note"] == "no Kalman run to pair with (ran: adam)"
    failed = RunResult("cu", "adam", [], seed=2)
    (row,) = summarize([*kalman_only, failed])
    assert row["note"] == "a run failed or logged no epoch (adam seed 2)"
    text = write_report(tmp_path / "out", "cu", 10, kalman_only, summarize(kalman_only), [])
    assert "no Adam run to pair with" in text.read_text()


def test_select_score_passes_the_preset_targets_as_score_scales_that_hydra_reads(tmp_path):
    from rlekf.bench import selection_note, selection_overrides
    from tests.helpers.hydra import compose_cfg

    assert selection_overrides("force", None, "cu_emt") == []
    assert selection_note("force", {"force": 0.03, "energy": 5e-4}, "cu_pwmat") is None
    over = selection_overrides("score", {"force": 0.06, "energy": 2.21e-3}, "si_mlearn")
    assert over[-1] == "monitor=val/score"
    cfg = compose_cfg("train", over, tmp_path)
    assert dict(cfg.task.score_scales) == {"energy_rmse": 2.21e-3, "force_rmse": 0.06}
    assert cfg.monitor == cfg.callbacks.model_checkpoint.monitor == "val/score"
    note = selection_note("score", {"force": 0.06, "energy": 2.21e-3}, "si_mlearn")
    assert "energy RMSE / 0.00221 eV/atom + force RMSE / 0.06 eV/Å" in note
    with pytest.raises(ValueError, match="needs the preset's targets for cu_emt"):
        selection_overrides("score", {}, "cu_emt")
    with pytest.raises(ValueError, match="needs the preset's targets"):
        selection_overrides("score", {"force": 0.03}, "cu_emt")


def test_select_score_reaches_every_run_and_is_refused_before_any_run(tmp_path, monkeypatch):
    import rlekf.bench as bench

    calls = _fake_training(monkeypatch)
    common = ["--budget", "10", "--seeds", "0", "--no-micro", "--device", "cpu"]
    common += ["--adam-epochs", "3", "--work", str(tmp_path / "w")]
    rc = bench.main(
        ["--preset", "cu", "--select", "score", "--out", str(tmp_path / "o1"), *common]
    )
    assert rc == 0 and calls
    for c in calls:
        assert "monitor=val/score" in c.overrides
        assert "task.score_scales={energy_rmse: 0.0005, force_rmse: 0.03}" in c.overrides
    md = next((tmp_path / "o1").glob("*.md")).read_text()
    assert "best checkpoints by validation score = energy RMSE / 0.0005 eV/atom" in md
    calls.clear()
    # the full preset has data sets without targets (cu_emt): refused before the first run
    with pytest.raises(ValueError, match="needs the preset's targets for cu_emt"):
        full = ["--preset", "full", "--select", "score", "--out", str(tmp_path / "o2")]
        bench.main(full + common)
    assert calls == []
