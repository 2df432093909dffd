"""Validation errors of runs at the training time of reference runs (equal-time comparison).

    .venv/bin/python bench/cpu/equal_time.py REF_DIR OTHER_DIR

Both are Hydra multirun folders of the same data, paired by ``seed`` (``.hydra/overrides.yaml``).
For each seed: the reference run's training seconds ``T`` (``time/train_s`` at its last
validation) and its final validation RMSE, and the other run's RMSE at its last validation with
``time/train_s <= T`` (the accounting of :mod:`rlekf.runs`: training time only). Prints a
Markdown table and the means.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import yaml

from rlekf.runs import read_metrics_csv


def _runs(folder: str) -> dict[str, list]:
    out = {}
    for job in sorted(Path(folder).iterdir()):
        if not (job / "csv" / "metrics.csv").exists():
            continue
        items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        ov = dict(item.split("=", 1) for item in items)
        out[ov.get("seed", "0")] = read_metrics_csv(job / "csv" / "metrics.csv")[0]
    return out


def main(ref_dir: str, other_dir: str) -> int:
    ref, other = _runs(ref_dir), _runs(other_dir)
    print(
        "| seed | T (train s) | ref force / energy RMSE | other at T: epoch, force / energy RMSE |"
    )
    print("|---|---|---|---|")
    rows = []
    for seed in sorted(set(ref) & set(other)):
        r = ref[seed][-1]
        t = r.train_s
        at = [p for p in other[seed] if p.train_s <= t]
        if not at:
            continue
        o = at[-1]
        rows.append((r.force_rmse, r.energy_rmse, o.force_rmse, o.energy_rmse))
        print(
            f"| {seed} | {t:.0f} | {r.force_rmse:.4f} / {r.energy_rmse:.2e} | "
            f"{o.epochs_done:.2f}, {o.force_rmse:.4f} / {o.energy_rmse:.2e} |"
        )
    if len(rows) >= 2:
        cols = list(zip(*rows, strict=True))
        m = [f"{statistics.mean(c):.4g} ± {statistics.stdev(c):.2g}" for c in cols]
        print(f"\nmeans: ref force {m[0]}, energy {m[1]}; other force {m[2]}, energy {m[3]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
