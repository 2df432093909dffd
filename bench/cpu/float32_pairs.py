"""Table of a float32 / float64 P multirun (bench/cpu/float32_pairs.sh): validation errors per
epoch, the paired float32 - float64 difference and the seed-to-seed spread beside it.

    python bench/cpu/float32_pairs.py SWEEP_DIR [SWEEP_DIR ...] [> table.md]
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from rlekf.runs import read_metrics_csv


def _overrides(job: Path) -> dict[str, str]:
    items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
    return dict(item.split("=", 1) for item in items)


def main(*sweep_dirs: str) -> int:
    runs: dict[tuple[str, str], list] = {}
    jobs = [job for d in sweep_dirs for job in sorted(Path(d).iterdir()) if job.is_dir()]
    for job in jobs:
        if not (job / "csv" / "metrics.csv").exists():
            continue
        ov = _overrides(job)
        curve, _ = read_metrics_csv(job / "csv" / "metrics.csv")
        runs[(ov["seed"], ov["optim.optimizer.p_dtype"])] = curve
    seeds = sorted({s for s, _ in runs})
    lines = [
        f"Paired runs in {', '.join(f'`{d}`' for d in sweep_dirs)} "
        f"(seeds {', '.join(seeds)}; only the P dtype differs).",
        "",
        "| epoch | quantity | "
        + " | ".join(f"seed {s} f64 / f32" for s in seeds)
        + " | max paired |f32 - f64| | seed spread (f64) |",
        "|---|---|" + "---|" * len(seeds) + "---|---|",
    ]
    n_epochs = min(len(c) for c in runs.values())
    for e in range(n_epochs):
        for q, unit in (("force_rmse", "eV/Å"), ("energy_rmse", "eV/atom")):
            cells, diffs, f64s = [], [], []
            for s in seeds:
                a = getattr(runs[(s, "float64")][e], q)
                b = getattr(runs[(s, "float32")][e], q)
                cells.append(f"{a:.4g} / {b:.4g}")
                diffs.append(abs(b - a))
                f64s.append(a)
            spread = max(f64s) - min(f64s)
            lines.append(
                f"| {e + 1} | {q.split('_')[0]} ({unit}) | "
                + " | ".join(cells)
                + f" | {max(diffs):.3g} | {spread:.3g} |"
            )
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
