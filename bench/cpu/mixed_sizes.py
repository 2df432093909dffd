"""Summary of ``bench/cpu/mixed_sizes.sh``: weight steps against frame size, validation curves.

    .venv/bin/python bench/cpu/mixed_sizes.py OUT [--md OUT/results.md]

Reads ``OUT/norm_<N>_seed_<s>/step_sizes.csv`` (the StepSizeLog callback) and
``OUT/norm_<N>_seed_<s>/csv/metrics.csv`` and writes a Markdown report: per atom-count group,
the median weight step of a frame's update (all its measurements) and its energy error before
the update; per epoch, the validation energy and force RMSE; the epoch-to-epoch jumps of the
validation energy (median |log10 ratio| between consecutive epochs).
"""

from __future__ import annotations

import argparse
import csv
import math
import platform
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path

from rlekf.runs import read_metrics_csv


def _runs(out: Path) -> dict[tuple[str, int], Path]:
    runs = {}
    for d in sorted(out.glob("norm_*_seed_*")):
        if d.is_dir():
            _, norm, _, seed = d.name.split("_")
            runs[(norm, int(seed))] = d
    return runs


def read_steps(run: Path) -> list[dict[str, float]]:
    """The StepSizeLog rows of a run (``csv/step_sizes.csv``; empty when it has none)."""
    path = run / "csv" / "step_sizes.csv"
    if not path.exists():
        return []
    with open(path, encoding="utf-8") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _bucket(n: int) -> str:
    return "12-24" if n <= 24 else "36-40" if n <= 40 else "63-64" if n <= 64 else "96"


def git_commit() -> str:
    """The short hash of HEAD ("" outside a git checkout)."""
    return subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()


def median_jump(values: list[float]) -> float:
    """Median |log10(v[i+1] / v[i])| over consecutive positive values (NaN: fewer than 2)."""
    logs = [math.log10(v) for v in values if v > 0]
    diffs = [abs(b - a) for a, b in zip(logs, logs[1:], strict=False)]
    return statistics.median(diffs) if diffs else math.nan


def report(out: Path) -> str:
    runs = _runs(out)
    commit = git_commit()
    lines = [
        "# RLEKF on frames of mixed sizes (si_mlearn, paper mode)",
        "",
        f"Machine: {platform.node()} ({platform.processor() or platform.machine()}), "
        f"commit {commit}. Command: `bash bench/cpu/mixed_sizes.sh {out} EPOCHS SEEDS`, then "
        f"`python bench/cpu/mixed_sizes.py {out}`. Force normalisation `null` = the paper's "
        "1/n of each frame; `64` = `optim.updater.force_norm_atoms=64` for every frame.",
        "",
        "## Weight step of one frame's update (all its measurements) by frame size",
        "",
        "| force norm | seed | atoms | frames | median ‖Δw‖₂ | median max abs Δw | "
        "median energy error before (meV/atom) |",
        "|---|---|---|---|---|---|---|",
    ]
    for (norm, seed), run in runs.items():
        groups = defaultdict(list)
        for row in read_steps(run):
            groups[_bucket(int(row["n_atoms"]))].append(row)
        for b in ("12-24", "36-40", "63-64", "96"):
            rows = groups.get(b, [])
            if not rows:
                continue
            med = statistics.median
            lines.append(
                f"| {norm} | {seed} | {b} | {len(rows)} | "
                f"{med(r['step_norm'] for r in rows):.3g} | "
                f"{med(r['max_step'] for r in rows):.3g} | "
                f"{1e3 * med(r['energy_error'] for r in rows):.3g} |"
            )
    lines += [
        "",
        "## Validation per epoch",
        "",
        "| force norm | seed | energy RMSE per epoch (meV/atom) | force RMSE per epoch (eV/Å) "
        "| median energy jump (decades) |",
        "|---|---|---|---|---|",
    ]
    for (norm, seed), run in runs.items():
        metrics = run / "csv" / "metrics.csv"
        if not metrics.exists():
            continue
        curve, _ = read_metrics_csv(metrics)
        e = [p.energy_rmse for p in curve]
        f = [p.force_rmse for p in curve]
        lines.append(
            f"| {norm} | {seed} | {', '.join(f'{1e3 * x:.3g}' for x in e)} | "
            f"{', '.join(f'{x:.3g}' for x in f)} | {median_jump(e):.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--md", type=Path, default=None, help="write the report here too")
    args = ap.parse_args()
    text = report(args.out)
    print(text)
    if args.md:
        args.md.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
