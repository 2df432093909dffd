"""rlekf.runs: the curve reader and the accounting shared by rlekf-bench and rlekf-report."""

from __future__ import annotations

import math

import pytest

from rlekf import runs as R


def _csv(tmp_path, text: str):
    path = tmp_path / "metrics.csv"
    path.write_text(text)
    return path


def test_reads_the_training_clock_and_fractional_epochs(tmp_path):
    path = _csv(
        tmp_path,
        "epoch,step,time/elapsed_s,time/train_s,time/epochs,val/energy_rmse,val/force_rmse\n"
        "0,9,,,,,\n"
        "0,9,12.0,10.0,1.0,0.1,0.5\n"
        "1,19,25.0,20.0,2.0,0.05,0.3\n"
        "2,23,33.0,24.0,2.4,0.04,0.2\n",
    )
    curve, test = R.read_metrics_csv(path)
    assert [p.epochs for p in curve] == [1.0, 2.0, 2.4]
    assert [p.train_time for p in curve] == [10.0, 20.0, 24.0]
    assert [p.time_s for p in curve] == [12.0, 25.0, 33.0]
    assert all(p.clock == "train" for p in curve) and test == {}
    assert R.s_per_epoch(curve) == pytest.approx(10.0)  # 20 s over 2 whole epochs


def test_older_logs_fall_back_to_the_wall_clock_and_epoch_index(tmp_path):
    path = _csv(
        tmp_path,
        "epoch,step,time/elapsed_s,val/energy_rmse,val/force_rmse\n0,4,2.5,0.1,0.5\n1,9,5.0,,0.4\n",
    )
    curve, _ = R.read_metrics_csv(path)
    assert [p.epochs for p in curve] == [1.0, 2.0] and [p.train_time for p in curve] == [2.5, 5.0]
    assert curve[0].clock == "wall" and math.isnan(curve[1].energy_rmse)


def test_a_bad_value_names_the_file_and_line(tmp_path):
    path = _csv(tmp_path, "epoch,step,val/force_rmse\n0,1,0.5\n1,2,oops\n")
    with pytest.raises(ValueError, match=r"metrics.csv:3: val/force_rmse .*'oops'"):
        R.read_metrics_csv(path)


def _curve(forces):
    return [R.ValPoint(k, k, float(k + 1), math.nan, f) for k, f in enumerate(forces)]


def test_stays_below_and_first_crossing():
    c = _curve([0.5, 0.1, 0.3, 0.1, 0.09])
    assert R.first_crossing(c, "force", 0.12).epoch == 1
    assert R.stays_below(c, "force", 0.12).epoch == 3
    assert R.stays_below(_curve([0.1, 0.1, 0.2]), "force", 0.12) is None  # ends above
    assert R.stays_below(_curve([0.1, math.nan, 0.1]), "force", 0.12).epoch == 2  # NaN breaks
    assert R.reach(c, "force", 0.12, "first").epoch == 1
    assert R.reach(c, "force", math.nan) is None
    with pytest.raises(ValueError, match="criterion"):
        R.reach(c, "force", 0.1, "best")


def test_ratio_of_means_bounds_both_ways():
    exact = R.ratio_of_means([4.0, 6.0], [9.0, 9.0], [2.0, 2.0], [5.0, 5.0])
    assert exact.bound == "=" and exact.value == pytest.approx(2.5)
    lower = R.ratio_of_means([None, 6.0], [9.0, 9.0], [2.0, 2.0], [5.0, 5.0])
    assert lower.bound == ">=" and lower.value == pytest.approx(7.5 / 2) and lower.n_adam == 1
    upper = R.ratio_of_means([4.0, 6.0], [9.0, 9.0], [None, 2.0], [5.0, 5.0])
    assert upper.bound == "<=" and upper.value == pytest.approx(5.0 / 3.5)
    neither = R.ratio_of_means([None, 6.0], [9.0, 9.0], [None, 2.0], [5.0, 5.0])
    assert neither.bound is None and str(neither) == "–"
    with pytest.raises(ValueError, match="one value per seed"):
        R.ratio_of_means([1.0], [1.0, 2.0], [1.0], [1.0])


def _dead_curve(forces, *, start=True):
    """Validation points 0.25 epoch apart (5 batches, 25 optimizer steps); the first at step 0
    when ``start``."""
    out = []
    for k, f in enumerate(forces):
        j = k if start else k + 1
        out.append(
            R.ValPoint(
                0, 5 * j, 1.0 * j, 0.1, f, train_s=1.0 * j, epochs_done=0.25 * j,
                optimizer_steps=25.0 * j,
            )
        )  # fmt: skip
    return out


def test_dead_time_is_read_from_the_step_0_validation():
    # 1.0 at step 0: below 0.5 first at 0.75 epoch, but stays below only from 1.25 epoch
    curve = _dead_curve([1.0, 0.9, 0.6, 0.45, 0.55, 0.4, 0.3])
    assert R.initial_point(curve) is curve[0]
    hit = R.dead_time(curve, "force")
    assert (hit.epochs, hit.optimizer_steps) == (1.25, 125)
    first = R.dead_time(curve, "force", criterion="first")
    assert (first.epochs, first.optimizer_steps) == (0.75, 75)
    assert R.dead_time(curve, "force", fraction=0.25) is None  # never below 0.25
    assert R.dead_time(curve, "force", fraction=0.95).optimizer_steps == 25
    # the reference is the step-0 value, not the best or the first trained point
    assert R.dead_time(_dead_curve([2.0, 0.9, 0.6, 0.45]), "force").optimizer_steps == 25
    with pytest.raises(ValueError, match="fraction"):
        R.dead_time(curve, "force", fraction=1.0)
    # the step-0 point takes no part in bests and targets: a target above the untrained
    # error is reached at the first trained point, not at step 0
    assert R.trained(curve) == curve[1:]
    assert R.reach(curve, "force", 5.0) is curve[1] and R.reach(curve, "force", 5.0, "first")
    assert R.best([_dead_curve([0.1, 0.9, 0.6])], "force") == 0.6


def test_dead_time_needs_a_step_0_point():
    curve = _dead_curve([1.0, 0.4, 0.3], start=False)
    assert R.initial_point(curve) is None
    with pytest.raises(ValueError, match="no validation at step 0"):
        R.dead_time(curve, "force")
