"""Which runs of divergence sweeps blew up: one Markdown row per run.

    .venv/bin/python bench/cpu/divergence_table.py MULTIRUN_DIR [MULTIRUN_DIR ...]

For each job of each multirun folder (``rlekf-train sweep=divergence_*`` with the csv logger):
its overrides that vary (the seed, data and sweep choice left out), the validation force RMSE
(eV/Å) at step 0, the largest after step 0 and the last, the last energy RMSE (eV/atom), the
training epochs done against those planned (``trainer.max_epochs``), the steps skipped for a
non-finite loss, gradient or innovation (``train/skipped`` of the gradient updater,
``kf/skipped`` of the Kalman filter: the run's last logged count, and the first logged step
with a skip; counts are logged every ``trainer.log_every_n_steps``) and the outcome:
``diverged`` when the run stopped early with skipped steps (``task.max_consecutive_skips``
consecutive skips end a run), ``stopped early`` when it stopped early without any, ``bounded``
otherwise. A non-finite validation RMSE counts as diverged too.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

from rlekf.report import find_job_dirs, load_run, override_key

SKIP_KEYS = ("train/skipped", "kf/skipped")
LEFT_OUT = ("seed", "data", "sweep", "hydra/launcher", "hydra.launcher.n_jobs")


def skip_counts(metrics: Path) -> tuple[float, float]:
    """``(last, step)``: the last logged count of skipped steps in a ``metrics.csv`` (0 when
    never logged) and the first logged step with a positive count (NaN: none)."""
    last, first_step = 0.0, math.nan
    with metrics.open(newline="") as fh:
        for row in csv.DictReader(fh):
            for key in SKIP_KEYS:
                text = row.get(key)
                if text not in (None, ""):
                    last = float(text)
                    if last > 0 and math.isnan(first_step):
                        first_step = float(row.get("step") or "nan")
    return last, first_step


def planned_epochs(job: Path) -> float:
    """The job's ``trainer.max_epochs`` (interpolations in its saved config resolved)."""
    cfg = OmegaConf.load(job / ".hydra" / "config.yaml")
    return float(OmegaConf.select(cfg, "trainer.max_epochs"))


def row_of(job: Path) -> dict[str, str]:
    run = load_run(job)
    label = " ".join(o for o in run.overrides if override_key(o) not in LEFT_OUT)
    metrics = next(iter(sorted(job.rglob("metrics.csv"))), None)
    skips, first_skip = skip_counts(metrics) if metrics else (math.nan, math.nan)
    curve = run.curve
    step0 = curve[0].force_rmse if curve and curve[0].step == 0 else math.nan
    after = [p.force_rmse for p in curve if p.step > 0]
    final_f = after[-1] if after else math.nan
    final_e = next((p.energy_rmse for p in reversed(curve) if p.step > 0), math.nan)
    epochs = max((p.epochs for p in curve if p.step > 0), default=0.0)
    planned = planned_epochs(job)
    finite = all(math.isfinite(v) for v in after)
    early = epochs < planned - 1e-9
    if (early and skips > 0) or not finite:
        outcome = "diverged"
    elif early:
        outcome = "stopped early"
    else:
        outcome = "bounded"
    return {
        "run": label,
        "seed": "" if run.seed is None else str(run.seed),
        "step-0 val F RMSE": f"{step0:.3g}",
        "max val F RMSE after step 0": f"{max(after):.3g}" if after else "–",
        "last val F RMSE": f"{final_f:.3g}",
        "last val E RMSE": f"{final_e:.3g}",
        "epochs done / planned": f"{epochs:g} / {planned:g}",
        "skipped steps (last logged)": f"{skips:g}",
        "first logged skip at step": "–" if math.isnan(first_skip) else f"{first_skip:g}",
        "outcome": outcome,
    }


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    rows = [row_of(job) for folder in argv for job in find_job_dirs(folder)]
    if not rows:
        print("no runs found", file=sys.stderr)
        return 1
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] for c in cols) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
