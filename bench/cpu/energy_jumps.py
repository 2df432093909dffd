"""Summary of ``bench/cpu/energy_jumps.sh``: is the validation energy's jumping an offset?

    .venv/bin/python bench/cpu/energy_jumps.py OUT [--md OUT/results.md]

Reads ``OUT/<name>_seed_<s>/csv/metrics.csv`` and ``.../csv/step_sizes.csv``. Per run and
validation: the energy RMSE, its signed mean (``val/energy_mean_error``, the offset common to
the frames) and the spread about that mean, ``sqrt(RMSE² - mean²)`` (what an exact refit of
the per-element energy bias would leave), all in meV/atom, and the force RMSE (eV/Å). Per
run: the median share of the energy MSE that is offset (mean² / RMSE²) and the median
epoch-to-epoch jump (|log10| of the ratio of consecutive validations) of the RMSE and of the
spread, after the first epoch. From the step log: per quarter epoch, the mean signed offset of
the training frames before their update and the summed change of their energy per atom made
by the updates (what drifts the offset), split by frame size; per training epoch, how much of
a frame's own energy offset its update removes: the medians of |offset before|, |change| and
|offset after| (meV/atom) and the least-squares slope and correlation of the change against
the offset before (slope -1: the update removes the frame's whole offset). With runs of
several names (``<name>_seed_<s>``, e.g. ``default`` and ``ema`` from ``callbacks=ema``): per
name, the mean over seeds of the final energy and force RMSE, the median energy RMSE and jump
over the validations after the first epoch.
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
from pathlib import Path

from mixed_sizes import git_commit, median_jump, read_steps  # bench/cpu, beside this file


def _f(text: str | None) -> float:
    return float(text) if text not in (None, "") else math.nan


def validations(run: Path) -> list[dict[str, float]]:
    """The run's validation rows after step 0: epochs, E RMSE, mean error, spread, F RMSE."""
    out = []
    with open(run / "csv" / "metrics.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        if row.get("val/force_rmse") in (None, ""):
            continue
        rmse, mean = _f(row.get("val/energy_rmse")), _f(row.get("val/energy_mean_error"))
        out.append(
            {
                "step": _f(row.get("step")),
                "epochs": _f(row.get("time/epochs")),
                "e_rmse": rmse,
                "e_mean": mean,
                "e_spread": math.sqrt(max(rmse**2 - mean**2, 0.0)),
                "f_rmse": _f(row.get("val/force_rmse")),
            }
        )
    return out


def total(rows: list[dict[str, float]]) -> float:
    """Summed ``energy_change`` of step-log rows, in meV/atom."""
    return 1e3 * sum(r["energy_change"] for r in rows if math.isfinite(r["energy_change"]))


def own_frame(rows: list[dict[str, float]]) -> str:
    """Medians of |offset before|, |change|, |offset after| and the slope and correlation of
    the change against the offset before, as the cells of a Markdown row (meV/atom)."""
    b = [1e3 * r["energy_bias"] for r in rows]
    d = [1e3 * r["energy_change"] for r in rows]
    after = [x + y for x, y in zip(b, d, strict=True)]
    slope = statistics.linear_regression(b, d).slope
    return (
        f"{statistics.median(map(abs, b)):.0f} | {statistics.median(map(abs, d)):.0f} | "
        f"{statistics.median(map(abs, after)):.0f} | {slope:.2f} | "
        f"{statistics.correlation(b, d):.2f}"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    runs = sorted(d for d in args.out.glob("*_seed_*") if (d / "csv" / "metrics.csv").exists())
    commit = git_commit()
    lines = [
        "# Validation energy of RLEKF on si_mlearn: offset against spread",
        "",
        f"Machine: {platform.node()} ({platform.machine()}), summary at commit {commit}. "
        "Energies in meV/atom, forces in eV/Å; spread = sqrt(RMSE² − mean²), what an exact refit "
        "of the energy bias would leave.",
        "",
        "## Per validation",
        "",
        "| run | optimizer steps | E RMSE | E mean error | E spread | F RMSE |",
        "|---|---|---|---|---|---|",
    ]
    summary = [
        "## Per run (validations after the first epoch)",
        "",
        "| run | validations | median offset share of the E MSE | median jump of E RMSE "
        "(decades) | median jump of E spread (decades) | final E RMSE | final E spread |",
        "|---|---|---|---|---|---|---|",
    ]
    drift = [
        "## Training frames: offset before the update and change made by the updates",
        "",
        "Per quarter epoch (in batches): mean signed offset of the frames before their update, "
        "summed change of their E/n made by the updates (meV/atom), split by frame size.",
        "",
        "| run | batches | mean offset before | summed change: all | 12–40 atoms | 63–64 | 96 |",
        "|---|---|---|---|---|---|---|",
    ]
    own = [
        "## A frame's own energy offset: before its update, the change, after",
        "",
        "| run | epoch | batches | median abs offset before | median abs change | median abs "
        "offset after | slope of change on offset | correlation |",
        "|---|---|---|---|---|---|---|---|",
    ]
    by_name: dict[str, list[list[dict[str, float]]]] = {}
    for run in runs:
        vals = validations(run)
        after_first = [v for v in vals if v["step"] > 0][4:]
        if after_first:
            by_name.setdefault(run.name.rsplit("_seed_", 1)[0], []).append(after_first)
        for v in vals:
            lines.append(
                f"| {run.name} | {v['step']:g} | {1e3 * v['e_rmse']:.3g} | "
                f"{1e3 * v['e_mean']:+.3g} | {1e3 * v['e_spread']:.3g} | {v['f_rmse']:.3g} |"
            )
        st = read_steps(run)
        per_epoch = max(1, len({s["step"] for s in st if s["epoch"] == 0}))
        later = [v for v in vals if v["step"] > 0][4:] or [v for v in vals if v["step"] > 0]
        shares = [v["e_mean"] ** 2 / v["e_rmse"] ** 2 for v in later if v["e_rmse"] > 0]
        if later:
            summary.append(
                f"| {run.name} | {len(later)} | "
                f"{statistics.median(shares):.2f} | "
                f"{median_jump([v['e_rmse'] for v in later]):.2f} | "
                f"{median_jump([v['e_spread'] for v in later]):.2f} | "
                f"{1e3 * later[-1]['e_rmse']:.3g} | {1e3 * later[-1]['e_spread']:.3g} |"
            )
        for epoch in sorted({int(r["epoch"]) for r in st}):
            rows = [r for r in st if int(r["epoch"]) == epoch]
            if len(rows) > 2:
                own.append(f"| {run.name} | {epoch} | {len(rows)} | {own_frame(rows)} |")
        quarter = max(1, per_epoch // 4)
        for start in range(0, len(st), quarter):
            chunk = st[start : start + quarter]

            small = [r for r in chunk if r["n_atoms"] <= 40]
            mid = [r for r in chunk if 60 <= r["n_atoms"] <= 64]
            big = [r for r in chunk if r["n_atoms"] >= 90]
            bias = [r["energy_bias"] for r in chunk if math.isfinite(r["energy_bias"])]
            drift.append(
                f"| {run.name} | {start}–{start + len(chunk) - 1} | "
                f"{1e3 * statistics.fmean(bias):+.3g} | {total(chunk):+.3g} | "
                f"{total(small):+.3g} ({len(small)}) | {total(mid):+.3g} ({len(mid)}) | "
                f"{total(big):+.3g} ({len(big)}) |"
                if bias
                else f"| {run.name} | {start}– | – | – | – | – | – |"
            )
    names = [
        "## By variant (mean over seeds; validations after the first epoch)",
        "",
        "| variant | seeds | final E RMSE | final E spread | median E RMSE | median jump of "
        "E RMSE (decades) | final F RMSE | median F RMSE |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, curves in by_name.items():

        def mean_of(f, curves=curves) -> float:
            return statistics.fmean(f(c) for c in curves)

        names.append(
            f"| {name} | {len(curves)} | {1e3 * mean_of(lambda c: c[-1]['e_rmse']):.3g} | "
            f"{1e3 * mean_of(lambda c: c[-1]['e_spread']):.3g} | "
            f"{1e3 * mean_of(lambda c: statistics.median(v['e_rmse'] for v in c)):.3g} | "
            f"{mean_of(lambda c: median_jump([v['e_rmse'] for v in c])):.2f} | "
            f"{mean_of(lambda c: c[-1]['f_rmse']):.3g} | "
            f"{mean_of(lambda c: statistics.median(v['f_rmse'] for v in c)):.3g} |"
        )
    text = "\n".join([*lines, "", *summary, "", *names, "", *own, "", *drift, ""])
    print(text)
    if args.md:
        args.md.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
