"""Block-size sweep table: equal numbers of updates and equal training time, per N_b.

    .venv/bin/python bench/cpu/block_size_table.py MULTIRUN_DIR

``MULTIRUN_DIR`` is the ``hydra.sweep.dir`` of a block-size sweep (``sweep=block_size_*``: one
job per ``optim.optimizer.block_size`` and ``seed``, each with ``csv/metrics.csv`` and
``train.log``). Prints one row per N_b, mean ± sample std over seeds:

- blocks and stored P (GiB), from the ``P holds ... GiB`` line of ``train.log``;
- the final validation force (eV/Å) and energy (eV/atom) RMSE: all runs made the same number
  of Kalman updates (the approximation question);
- training seconds per epoch and per optimizer step (``time/optimizer_steps``: a Kalman update
  in paper mode, a batch in fused mode), both at the last
  validation (with ``val_check_interval`` < 1 it may fall just before an epoch's end);
- the validation RMSE at the shortest run's training time ``T`` of each seed (the last
  validation with ``time/train_s <= T``; the user's question at that budget), with the
  fraction of an epoch each N_b had trained by then;
- the ratio of each mean force RMSE to the one-block (GEKF) row's over the seeds both have, at
  equal updates and at T. A seed with no validation by T is left out of the "at T" columns.
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from pathlib import Path

import yaml

from rlekf.runs import read_metrics_csv

P_LINE = re.compile(r"in (\d+) blocks .*P holds [\d,]+ entries = ([\d.]+) GiB")


def _ms(values: list[float], fmt: str) -> str:
    values = [v for v in values if math.isfinite(v)]
    if len(values) > 1:
        return f"{format(statistics.fmean(values), fmt)} ± {format(statistics.stdev(values), fmt)}"
    return format(values[0], fmt) if values else "–"


def _paired_ratio(row: dict, ref: dict, key: str) -> str:
    """Ratio of the means of ``key`` over the seeds both rows have finite values for."""
    a, b = dict(row[key]), dict(ref[key])
    both = [s for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])]
    if not both:
        return "–"
    return f"{statistics.fmean(a[s] for s in both) / statistics.fmean(b[s] for s in both):.2f}"


def load(folder: str | Path) -> dict[str, dict[str, dict]]:
    """``{block_size: {seed: {"curve", "blocks", "gib"}}}`` of the finished jobs."""
    out: dict[str, dict[str, dict]] = {}
    for job in sorted(Path(folder).iterdir(), key=lambda p: p.name):
        metrics = job / "csv" / "metrics.csv"
        if not metrics.exists():
            continue
        items = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        ov = dict(item.split("=", 1) for item in items)
        curve = [p for p in read_metrics_csv(metrics)[0] if p.epochs > 0]  # no step-0 point
        if not curve:  # started, not validated yet
            continue
        found = P_LINE.search((job / "train.log").read_text(errors="replace"))
        out.setdefault(ov["optim.optimizer.block_size"], {})[ov.get("seed", "0")] = {
            "curve": curve,
            "blocks": int(found.group(1)) if found else None,
            "gib": float(found.group(2)) if found else float("nan"),
        }
    return out


def main(folder: str) -> int:
    runs = load(folder)
    # a job still running (or cut short) has trained fewer epochs than the others: left out
    full = max(r["curve"][-1].epochs for v in runs.values() for r in v.values())
    for bs in list(runs):
        for s in [s for s, r in runs[bs].items() if r["curve"][-1].epochs < 0.999 * full]:
            print(f"left out: block_size={bs} seed={s} (unfinished)")
            del runs[bs][s]
        if not runs[bs]:
            del runs[bs]
    seeds = sorted(set().union(*(set(v) for v in runs.values())))
    # per seed: the shortest total training time over the block sizes
    t_eq = {s: min(r[s]["curve"][-1].train_s for r in runs.values() if s in r) for s in seeds}
    rows = {}
    for bs, by_seed in runs.items():
        fin_f, fin_e, spe, spu, eq_f, eq_e, eq_ep = [], [], [], [], [], [], []
        for s, run in by_seed.items():
            c = run["curve"]
            fin_f.append((s, c[-1].force_rmse))
            fin_e.append(c[-1].energy_rmse)
            spe.append(c[-1].train_s / c[-1].epochs)
            spu.append(c[-1].train_s / c[-1].optimizer_steps)
            at = [p for p in c if p.train_s <= t_eq[s] + 1e-9]
            if at:
                eq_f.append((s, at[-1].force_rmse))
                eq_e.append(at[-1].energy_rmse)
                eq_ep.append(at[-1].epochs)
        first = next(iter(by_seed.values()))
        rows[bs] = dict(
            n=len(by_seed), blocks=first["blocks"], gib=first["gib"], fin_f=fin_f, fin_e=fin_e,
            spe=spe, spu=spu, eq_f=eq_f, eq_e=eq_e, eq_ep=eq_ep,
        )  # fmt: skip
    ref = rows.get("null")
    order = sorted(rows, key=lambda b: float("inf") if b == "null" else int(b))
    print(f"T (shortest run's training s per seed): {', '.join(f'{t_eq[s]:.0f}' for s in seeds)}")
    print()
    print(
        "| N_b | seeds | blocks | stored P (GiB) | final val F RMSE (eV/Å) | final val E RMSE "
        "(eV/atom) | train s/epoch | train ms/optimizer step | at T: epochs | at T: F RMSE | "
        "at T: E RMSE | F / GEKF's (equal updates) | F / GEKF's (at T) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for bs in order:
        r = rows[bs]
        rel = rel_t = "–"
        if ref:
            rel, rel_t = _paired_ratio(r, ref, "fin_f"), _paired_ratio(r, ref, "eq_f")
        print(
            f"| {'one block (GEKF)' if bs == 'null' else bs} | {r['n']} | {r['blocks']} | "
            f"{r['gib']:.2f} | {_ms([v for _, v in r['fin_f']], '.4f')} | "
            f"{_ms(r['fin_e'], '.2e')} | "
            f"{_ms(r['spe'], '.1f')} | {_ms([1e3 * x for x in r['spu']], '.0f')} | "
            f"{_ms(r['eq_ep'], '.2f')} | {_ms([v for _, v in r['eq_f']], '.4f')} | "
            f"{_ms(r['eq_e'], '.2e')} | "
            f"{rel} | {rel_t} |"
        )
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
