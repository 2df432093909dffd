"""``rlekf-report`` on a synthetic multirun folder (no training)."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path

import pytest
import yaml

from rlekf import report as R


def _job(
    root: Path,
    num: int,
    *,
    optim: str = "rlekf",
    block_size: int | None = 512,
    init: str = "deepmd",
    seed: int = 0,
    data: str = "cu_emt",
    curve: list[tuple[float, float, float]],
    extra: list[str] | None = None,
    metrics: bool = True,
) -> Path:
    """A fake job folder; ``curve`` holds ``(energy, force, seconds)`` per epoch."""
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"optim.optimizer.block_size={block_size}", f"model/init={init}", f"seed={seed}"]
    if optim == "adam":
        overrides = [f"optim={optim}", f"model/init={init}", f"seed={seed}"]
    overrides += ["sweep=block_size_x_init", *(extra or [])]
    optimizer = {"block_size": block_size} if optim != "adam" else {"lr": 1e-3}
    config = {
        "seed": seed,
        "optim": {"name": optim, "optimizer": optimizer},
        "model": {"init": {"_target_": f"rlekf.models.init.{init}", "scale": 1.0}},
    }
    choices = {"optim": optim, "data": data, "model/init": init}
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )
    if metrics:
        (job / "csv").mkdir()
        cols = [
            "epoch",
            "kf/lambda",
            "step",
            "time/elapsed_s",
            "val/energy_rmse",
            "val/force_rmse",
        ]
        with (job / "csv" / "metrics.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*cols, "train/force_rmse"])
            for ep, (e, f, t) in enumerate(curve):
                w.writerow([ep, 0.98, 10 * ep + 9, "", "", "", ""])  # a step row
                w.writerow([ep, "", 10 * ep + 9, t, e, f, ""])  # validation row
                w.writerow([ep, "", 10 * ep + 9, "", "", "", 0.5])  # train epoch row
    return job


@pytest.fixture
def sweep(tmp_path) -> Path:
    root = tmp_path / "multirun"
    curves = {
        # (block size, init, seed): (energy, force, seconds) per epoch
        (512, "deepmd", 0): [(0.10, 0.50, 1.0), (0.05, 0.20, 2.0), (0.04, 0.10, 3.0)],
        (512, "deepmd", 1): [(0.12, 0.60, 1.1), (0.06, 0.30, 2.2), (0.05, 0.13, 3.3)],
        (1024, "deepmd", 0): [(0.20, 0.80, 2.0), (0.10, 0.40, 4.0), (0.02, 0.30, 6.0)],
        (1024, "deepmd", 1): [(0.20, 0.90, 2.0), (0.10, 0.50, 4.0), (0.08, 0.35, 6.0)],
        (512, "xavier_uniform", 0): [(0.3, 0.9, 1.0), (0.2, 0.11, 2.0), (0.1, 0.15, 3.0)],
        (512, "xavier_uniform", 1): [(0.3, 0.9, 1.0), (0.2, 0.8, 2.0), (0.1, 0.7, 3.0)],
    }
    for num, ((bs, init, seed), curve) in enumerate(curves.items()):
        _job(root, num, block_size=bs, init=init, seed=seed, curve=curve)
    _job(root, len(curves), seed=2, curve=[], metrics=False)  # a crashed run
    return root


def test_read_metrics_csv_takes_validation_rows(sweep):
    curve, test = R.read_metrics_csv(sweep / "0" / "csv" / "metrics.csv")
    assert [p.force_rmse for p in curve] == [0.5, 0.2, 0.1]
    assert [p.time_s for p in curve] == [1.0, 2.0, 3.0]
    assert [p.epoch for p in curve] == [0, 1, 2]
    assert test == {}


def test_time_falls_back_to_the_epochs_time_row(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,step,time/elapsed_s,val/energy_rmse,val/force_rmse,test/force_rmse\n"
        "0,4,,0.1,0.5,\n0,4,2.5,,,\n1,9,,0.05,0.25,\n1,9,,,,0.3\n"
    )
    curve, test = R.read_metrics_csv(path)
    assert curve[0].time_s == 2.5 and math.isnan(curve[1].time_s)
    assert test == {"test/force_rmse": 0.3}


def test_load_run_reads_factors(sweep):
    run = R.load_run(sweep / "2")
    assert run.factors == {
        "optim": "rlekf",
        "data": "cu_emt",
        "block_size": "1024",
        "init": "deepmd",
        "init_scale": "1.0",
    }
    assert run.seed == 0 and run.status == "ok" and len(run.curve) == 3
    missing = R.load_run(sweep / "6")
    assert missing.curve == [] and "csv" in missing.status


def test_targets_and_run_metrics(sweep):
    runs = [R.load_run(p) for p in R.find_job_dirs(sweep)]
    assert [r.job for r in runs] == [str(i) for i in range(7)]
    targets = R.compute_targets(runs, 1.2)
    e_t, f_t = targets["cu_emt"]
    assert f_t == pytest.approx(1.2 * 0.10) and e_t == pytest.approx(1.2 * 0.02)
    m = R.run_metrics(runs[0], e_t, f_t)
    assert m["final_force_rmse"] == 0.10 and m["best_force_rmse"] == 0.10
    assert m["epochs_to_target_force"] == 3.0 and m["time_to_target_force_s"] == 3.0
    assert math.isnan(m["epochs_to_target_energy"])  # 0.04 > 0.024
    m4 = R.run_metrics(runs[4], e_t, f_t)  # reaches the target at epoch 2, then gets worse
    assert math.isnan(m4["epochs_to_target_force"])  # does not stay below: not reached
    assert m4["first_epochs_to_target_force"] == 2.0 and m4["first_time_to_target_force_s"] == 2
    assert m4["final_force_rmse"] == 0.15
    assert m4["best_force_rmse"] == 0.11


def test_a_run_stopped_before_its_first_validation_has_only_its_step_0_point(sweep, tmp_path):
    job = _job(sweep, 7, seed=3, curve=[], metrics=False)
    (job / "csv").mkdir()
    (job / "csv" / "metrics.csv").write_text(
        "epoch,step,time/elapsed_s,time/train_s,time/epochs,val/energy_rmse,val/force_rmse\n"
        "0,0,0.5,0.0,0.0,0.3,0.9\n"  # the untrained model, then the run stopped
    )
    run = R.load_run(job)
    assert run.status == "ok" and len(run.curve) == 1
    m = R.run_metrics(run, 0.1, 0.1)
    assert m["initial_force_rmse"] == 0.9
    assert all(math.isnan(v) for k, v in m.items() if k != "initial_force_rmse")
    rep = R.build_report(sweep, tmp_path / "out")  # the report still builds
    with (tmp_path / "out" / "runs.csv").open() as fh:
        rows = {r["job"]: r for r in csv.DictReader(fh)}
    assert rows["7"]["initial_force_rmse"] == "0.9" and rows["7"]["final_force_rmse"] == ""
    assert rep.files


def test_varying_overrides_and_group_labels(sweep):
    runs = [R.load_run(p) for p in R.find_job_dirs(sweep)]
    keys = R.varying_overrides(runs)
    assert keys == ["optim.optimizer.block_size", "model/init"]
    assert (
        R.group_label(runs[4], keys) == "optim.optimizer.block_size=512,model/init=xavier_uniform"
    )


def test_aggregate_mean_and_sample_std():
    rows = [
        {"g": "a", "x": 1.0},
        {"g": "a", "x": 3.0},
        {"g": "b", "x": 2.0},
        {"g": "a", "x": math.nan},
    ]
    out = R.aggregate(rows, lambda r: r["g"], ["x"])
    assert [o["group"] for o in out] == ["a", "b"]
    assert out[0]["x_mean"] == 2.0 and out[0]["x_std"] == statistics.stdev([1.0, 3.0])
    assert out[0]["x_n"] == 2 and out[0]["n_runs"] == 3
    assert out[1]["x_mean"] == 2.0 and math.isnan(out[1]["x_std"])
    assert R.format_mean_std(0.123456, 0.0123, 2, 3) == "0.1235 ± 0.012 (2/3)"
    assert R.format_mean_std(math.nan, math.nan) == "–"


def test_build_report_writes_tables_and_plots(sweep, tmp_path):
    rep = R.build_report(sweep, tmp_path / "out")
    names = {p.name for p in rep.files}
    assert {"runs.csv", "summary.csv", "summary.md", "curves.png", "summary.png"} <= names
    assert {"by_block_size.csv", "by_init.csv"} <= names  # two factors vary
    assert all(p.stat().st_size > 0 for p in rep.files)
    with (tmp_path / "out" / "summary.csv").open() as fh:
        summary = {r["group"]: r for r in csv.DictReader(fh)}
    g = summary["optim.optimizer.block_size=512,model/init=deepmd"]
    assert int(g["n_runs"]) == 2
    assert float(g["final_force_rmse_mean"]) == pytest.approx(0.115)
    assert float(g["final_force_rmse_std"]) == pytest.approx(statistics.stdev([0.10, 0.13]))
    assert float(g["time_to_target_force_s_mean"]) == pytest.approx(3.0)
    assert int(g["time_to_target_force_s_n"]) == 1  # seed 1 ends at 0.13 > 0.12
    with (tmp_path / "out" / "by_block_size.csv").open() as fh:
        by_bs = {r["group"]: r for r in csv.DictReader(fh)}
    assert int(by_bs["block_size=512"]["n_runs"]) == 4
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## By init" in md and "Runs without metrics" in md and "- 6:" in md
    assert "0.115 ± 0.021" in md and "3 (1/2)" in md


def test_cli(sweep, tmp_path, capsys):
    assert R.main([str(sweep), "--out", str(tmp_path / "o"), "--no-plots"]) == 0
    assert "| group |" in capsys.readouterr().out
    assert not (tmp_path / "o" / "curves.png").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert R.main([str(empty)]) == 1


def test_curves_are_plotted_against_training_time(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from rlekf.runs import ValPoint

    pts = [  # validation takes 10 s of wall-clock after each 2 s of training
        ValPoint(epoch=k, step=k + 1, time_s=12.0 * (k + 1), energy_rmse=0.1, force_rmse=0.5,
                 train_s=2.0 * (k + 1), epochs_done=k + 1.0)
        for k in range(3)
    ]  # fmt: skip
    run = R.Run(tmp_path, "0", [], {"data": "cu_emt", "optim": "rlekf"}, 0, curve=pts)
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    R.plot_curves([run], ["rlekf"], tmp_path / "curves.png")
    (epochs_ax, time_ax) = saved[0].axes[:2]
    assert list(epochs_ax.lines[0].get_xdata()) == [1.0, 2.0, 3.0]
    assert list(time_ax.lines[0].get_xdata()) == [2.0, 4.0, 6.0]  # not the 12, 24, 36 s
    assert time_ax.get_xlabel() == "training time (s)"
