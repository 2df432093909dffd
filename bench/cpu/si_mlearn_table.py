"""The mlearn Si table from ``bench/cpu/si_mlearn_table.sh OUT``: test-split MAE/RMSE per group.

    .venv/bin/python bench/cpu/si_mlearn_table.py OUT [--md OUT/table.md]

Per optimizer (mean ± std over seeds) and per mlearn group: energy MAE/RMSE (meV/atom), the mean
energy error (the constant offset) and force MAE/RMSE (eV/Å) of the best checkpoint (by validation
force RMSE, or by the validation score when the run used ``SELECT=score``: the table's first line
says which, from ``OUT/started.txt``) as trained (``raw``) and with the energy bias refitted on the
training split (``bias``), beside the published test MAE of GAP and MTP (Zuo et al., J. Phys. Chem.
A 124, 731 (2020), as given in ``../shared/data/si_mlearn/SOURCE.md``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

#: published test MAE on the same split (energy meV/atom, force eV/Å), from SOURCE.md
PUBLISHED = {"GAP": (2.91, 0.07), "MTP": (2.21, 0.06)}
GROUPS = ("all", "AIMD-NVT", "Elastic", "Surface", "Vacancy")


def _cell(values: list[float], scale: float = 1.0, spec: str = ".3g") -> str:
    v = [scale * x for x in values]
    if not v:
        return "n/a"
    if len(v) == 1:
        return f"{v[0]:{spec}}"
    return f"{statistics.mean(v):{spec}} ± {statistics.stdev(v):{spec}}"


def collect(out: Path) -> dict[tuple[str, str, str], dict[str, list[float]]]:
    """(optim, variant, group) -> metric -> values over seeds."""
    table: dict[tuple[str, str, str], dict[str, list[float]]] = defaultdict(
        lambda: defaultdict(list)
    )
    for run in sorted((out / "work" / "si_mlearn").glob("seed*/*/")):
        optim = run.name
        for variant in ("raw", "bias"):
            folder = run / f"test_{variant}"
            if not (folder / "metrics.json").exists():
                continue
            per = {"all": json.loads((folder / "metrics.json").read_text())}
            groups = folder / "metrics_by_group.json"
            if groups.exists():
                per.update(json.loads(groups.read_text()))
            for g, m in per.items():
                for k in ("energy_mae", "energy_rmse", "energy_mean_error", "force_mae"):
                    table[(optim, variant, g)][k].append(m[k])
                table[(optim, variant, g)]["force_rmse"].append(m["force_rmse"])
    return table


def selection(out: Path) -> str:
    """What picked the checkpoints: ``select=`` in ``OUT/started.txt`` (absent: force), worded
    as ``rlekf-bench``'s report note with the ``full`` preset's si_mlearn targets."""
    from rlekf.bench import PRESETS, selection_note

    started = out / "started.txt"
    words = started.read_text().split() if started.exists() else []
    select = next((w.split("=", 1)[1] for w in words if w.startswith("select=")), "force")
    note = selection_note(select, PRESETS["full"]["datasets"]["si_mlearn"]["targets"], "si_mlearn")
    return note.lstrip("- ") if note else "si_mlearn: best checkpoints by validation force RMSE."


def validation(out: Path) -> str:
    """Per run: the selected checkpoint's validation errors (its epoch from the file name) and
    the last validation's, from the run's ``csv/metrics.csv``."""
    from rlekf.runs import read_metrics_csv

    lines = [
        "| run | selected epoch (training s) | val force RMSE there (eV/Å) | val energy RMSE "
        "there (meV/atom) | best val force RMSE of the run | last: epochs, force / energy |",
        "|---|---|---|---|---|---|",
    ]
    for run in sorted((out / "work" / "si_mlearn").glob("seed*/*/")):
        best = sorted(run.glob("checkpoints/best_weights_epoch_*.ckpt"))
        metrics = run / "csv" / "metrics.csv"
        if not best or not metrics.exists():
            continue
        epoch = int(re.search(r"epoch_(\d+)", best[0].name).group(1))
        curve = read_metrics_csv(metrics)[0]
        sel = next((p for p in curve if p.epoch == epoch), None)
        if sel is None:
            continue
        last = curve[-1]
        f_best = min(p.force_rmse for p in curve)
        lines.append(
            f"| {run.name} {run.parent.name} | {sel.epochs_done:.3g} ({sel.train_s:.0f} s) | "
            f"{sel.force_rmse:.4g} | {1e3 * sel.energy_rmse:.3g} | {f_best:.4g} | "
            f"{last.epochs_done:.3g}: {last.force_rmse:.4g} / {1e3 * last.energy_rmse:.3g} |"
        )
    return "\n".join(lines) + "\n"


def report(out: Path) -> str:
    table = collect(out)
    lines = [
        selection(out),
        "",
        "| model | bias | group | seeds | energy MAE (meV/atom) | energy RMSE | mean energy "
        "error | force MAE (eV/Å) | force RMSE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (e, f) in PUBLISHED.items():
        lines.append(f"| {name} (published) | | all | | {e} | | | {f} | |")
    for (optim, variant, g), m in sorted(
        table.items(), key=lambda kv: (kv[0][0], kv[0][1], GROUPS.index(kv[0][2]))
    ):
        lines.append(
            f"| {optim} | {'training-split refit' if variant == 'bias' else 'as trained'} | {g} "
            f"| {len(m['energy_mae'])} | {_cell(m['energy_mae'], 1e3)} | "
            f"{_cell(m['energy_rmse'], 1e3)} | {_cell(m['energy_mean_error'], 1e3, '+.3g')} | "
            f"{_cell(m['force_mae'])} | {_cell(m['force_rmse'])} |"
        )
    lines += ["", "Validation (what selected the checkpoints):", "", validation(out)]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--md", type=Path, default=None)
    args = ap.parse_args()
    text = report(args.out)
    print(text)
    if args.md:
        args.md.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
