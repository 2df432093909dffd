"""Spread of final validation errors across weight initialisations, per optimizer.

    .venv/bin/python bench/cpu/init_spread.py REPORT_DIR [LABEL=REPORT_DIR ...] [OUT.png]

``REPORT_DIR`` is what ``rlekf-report`` wrote for an ``init`` sweep (``runs.csv``: one row per
run with ``optim``, ``init``, ``init_scale``, ``seed`` and the final RMSEs). Several reports
are pooled; ``LABEL=REPORT_DIR`` appends `` LABEL`` to the optimizer names of that report's
runs (e.g. ``"lr1e-2=logs/report_adam_lr"`` for a re-run of Adam with another learning
rate). Prints, per optimizer, the spread of the final force (eV/Å) and energy (eV/atom) RMSE
over all its runs (every scheme × scale × seed): mean, sample std, coefficient of variation,
min, max and max / min (runs whose final error is not finite are counted apart); then the
grid scheme × scale of the mean final force / energy RMSE over seeds, one column per
optimizer. With ``OUT.png``: the final errors per run, one column of points per optimizer,
coloured by scheme.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path


def _f(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def load(report_dir: str | Path, label: str | None = None) -> list[dict]:
    """The finished runs of one report; with ``label``, their ``optim`` becomes
    ``"<optim> <label>"``."""
    with open(Path(report_dir) / "runs.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("status", "ok") == "ok"]
    if label:
        for r in rows:
            r["optim"] = f"{r['optim']} {label}"
    return rows


def load_all(specs: list[str]) -> list[dict]:
    """Pool the reports ``specs`` (each ``REPORT_DIR`` or ``LABEL=REPORT_DIR``)."""
    rows: list[dict] = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if Path(spec).is_dir() or not sep or "/" in label:  # a folder whose name holds "="
            rows += load(spec)
        else:
            rows += load(path, label)
    return rows


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample std, std/mean, min, max, max/min of the finite values (NaN: a diverged run
    counts in ``n_bad``)."""
    good = [v for v in values if math.isfinite(v)]
    out = {"n": len(good), "n_bad": len(values) - len(good)}
    if len(good) < 2:
        return out | {k: math.nan for k in ("mean", "std", "cv", "min", "max", "ratio")}
    mean, std = statistics.fmean(good), statistics.stdev(good)
    lo, hi = min(good), max(good)
    return out | {
        "mean": mean,
        "std": std,
        "cv": std / mean,
        "min": lo,
        "max": hi,
        "ratio": hi / lo,
    }


def main(specs: list[str], png: str | None = None) -> int:
    rows = load_all(specs)
    optims = sorted({r["optim"] for r in rows})
    print("| optimizer | runs | quantity | mean | std | std / mean | min | max | max / min |")
    print("|---|---|---|---|---|---|---|---|---|")
    for opt in optims:
        mine = [r for r in rows if r["optim"] == opt]
        for key, name in (("final_force_rmse", "force"), ("final_energy_rmse", "energy")):
            s = spread([_f(r[key]) for r in mine])
            bad = f" ({s['n_bad']} not finite)" if s["n_bad"] else ""
            print(
                f"| {opt} | {s['n']}{bad} | {name} | {s['mean']:.3g} | {s['std']:.2g} | "
                f"{s['cv']:.2f} | {s['min']:.3g} | {s['max']:.3g} | {s['ratio']:.2f} |"
            )
    print()
    print("| scheme | scale | " + " | ".join(f"{o}: final F / E RMSE" for o in optims) + " |")
    print("|---|---|" + "---|" * len(optims))
    cells = sorted({(r["init"], r["init_scale"]) for r in rows}, key=lambda c: (c[0], _f(c[1])))
    for init, scale in cells:
        parts = []
        for opt in optims:
            mine = [
                r for r in rows if (r["optim"], r["init"], r["init_scale"]) == (opt, init, scale)
            ]
            f = spread([_f(r["final_force_rmse"]) for r in mine] * 2)  # mean of 1 value too
            e = spread([_f(r["final_energy_rmse"]) for r in mine] * 2)
            bad = f" ({f['n_bad'] // 2} not finite)" if f["n_bad"] else ""
            parts.append(f"{f['mean']:.3g} / {e['mean']:.2g}{bad}")
        print(f"| {init} | {scale} | " + " | ".join(parts) + " |")
    if png:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        schemes = sorted({r["init"] for r in rows})
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), constrained_layout=True)
        for ax, key, label in (
            (axes[0], "final_force_rmse", "final val force RMSE (eV/Å)"),
            (axes[1], "final_energy_rmse", "final val energy RMSE (eV/atom)"),
        ):
            for i, opt in enumerate(optims):
                for j, scheme in enumerate(schemes):
                    ys = [_f(r[key]) for r in rows if r["optim"] == opt and r["init"] == scheme]
                    xs = [i + 0.12 * (j - (len(schemes) - 1) / 2)] * len(ys)
                    ax.scatter(xs, ys, s=18, color=f"C{j}", label=scheme if i == 0 else None)
            ax.set_xticks(range(len(optims)), optims)
            ax.set_yscale("log")
            ax.set_ylabel(label)
        axes[0].legend(fontsize=7, title="scheme", title_fontsize=7)
        fig.savefig(png, dpi=120)
        print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    args = sys.argv[1:]
    out_png = args.pop() if args and args[-1].endswith(".png") else None
    if not args:
        sys.exit(__doc__)
    sys.exit(main(args, out_png))
