"""Learning curve of long runs, per validation: where the best point was and what came after.

    .venv/bin/python bench/cpu/long_run_curve.py RUN_DIR [RUN_DIR ...] [--every 5] [--md OUT.md]

Each RUN_DIR is an ``rlekf-train`` run folder (``csv/metrics.csv``). Per run: the best
validation force RMSE and where it was, the last point, the median of the last quarter of the
validations, and a table every ``--every`` validations of the validation energy/force RMSE,
the training-set RMSE logged over the epoch before it (errors of each frame before its update)
and, for Kalman runs, the trace of P summed over its blocks and λ. Energies in meV/atom,
forces in eV/Å.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

from rlekf.runs import read_metrics_csv


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _f(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def summarize(run: Path, every: int) -> list[str]:
    metrics = run / "csv" / "metrics.csv"
    curve, _ = read_metrics_csv(metrics)
    rows = _rows(metrics)
    train = {}  # epoch -> train/* of that epoch
    kalman = {}  # epoch -> (sum of P traces, lambda) at the last step row of the epoch
    for r in rows:
        if r.get("epoch") in (None, ""):
            continue
        epoch = int(float(r["epoch"]))
        if r.get("train/force_rmse"):
            train[epoch] = (_f(r.get("train/energy_rmse")), _f(r["train/force_rmse"]))
        traces = [_f(v) for k, v in r.items() if k.startswith("kf/P") and k.endswith("_trace")]
        if traces and all(math.isfinite(t) for t in traces):
            kalman[epoch] = (sum(traces), _f(r.get("kf/lambda")))
    trained = [p for p in curve if p.epochs > 0]
    if not trained:
        return [f"## {run}", "", "no validation after training", ""]
    best = min(trained, key=lambda p: p.force_rmse)
    tail = trained[-max(1, len(trained) // 4) :]
    lines = [
        f"## `{run}`",
        "",
        f"- {len(trained)} validations, {trained[-1].epochs:.3g} epochs, "
        f"{trained[-1].train_time:.0f} s of training",
        f"- best val force RMSE {best.force_rmse:.4g} eV/Å at epoch {best.epochs:.3g} "
        f"({best.train_time:.0f} s; energy {1e3 * best.energy_rmse:.3g} meV/atom)",
        f"- last: force {trained[-1].force_rmse:.4g} eV/Å, energy "
        f"{1e3 * trained[-1].energy_rmse:.3g} meV/atom",
        f"- median of the last quarter ({len(tail)} validations): force "
        f"{statistics.median(p.force_rmse for p in tail):.4g} eV/Å, energy "
        f"{1e3 * statistics.median(p.energy_rmse for p in tail):.3g} meV/atom",
        "",
        "| epochs | train s | val E RMSE | val F RMSE | train E RMSE | train F RMSE | ΣtrP | λ |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, p in enumerate(trained):
        if i % every and i != len(trained) - 1 and p is not best:
            continue
        te, tf = train.get(p.epoch, (math.nan, math.nan))
        tr, lam = kalman.get(p.epoch, (math.nan, math.nan))
        mark = " (best)" if p is best else ""
        lines.append(
            f"| {p.epochs:.3g}{mark} | {p.train_time:.0f} | {1e3 * p.energy_rmse:.3g} | "
            f"{p.force_rmse:.4g} | {1e3 * te:.3g} | {tf:.4g} | {tr:.3g} | {lam:.6g} |"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--every", type=int, default=5, help="table row every N validations")
    ap.add_argument("--md", type=Path, default=None, help="also write the text here")
    args = ap.parse_args(argv)
    text = "\n".join(line for run in args.runs for line in summarize(run, max(1, args.every)))
    print(text)
    if args.md:
        args.md.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
