"""``rlekf-report <multirun dir>``: tables and plots of a sweep, read from disk (no network).

A Hydra multirun folder holds one sub-folder per job (``0/``, ``1/``, ...), each with
``.hydra/overrides.yaml``, ``.hydra/config.yaml``, ``.hydra/hydra.yaml`` and the CSV logger's
``csv/metrics.csv`` (the sweep files force the csv logger; it is the source of truth here).
For every run the report takes the validation curve (``val/energy_rmse`` in eV/atom,
``val/force_rmse`` in eV/Å, and the clocks ``time/train_s``, ``time/epochs`` and
``time/elapsed_s`` logged by ``EpochSummary``; read by :mod:`rlekf.runs`, the same reader and
accounting as ``rlekf-bench``) and computes:

* final and best validation energy/force RMSE;
* training epochs and training seconds (validation and checkpoint writes excluded) until the
  validation RMSE stays below a target to the end of the run, and until it first crosses it,
  the target being ``target_factor`` (1.2) × the best RMSE reached by any run on the same
  data set; a truncated last epoch counts as the fraction it ran, seconds per epoch come from
  whole epochs only.

Runs that differ only by ``seed`` form a group; groups are reported as mean ± sample standard
deviation over seeds, also per single factor (block size, init, ...) when several vary. Output
(``<multirun dir>/report`` by default): ``runs.csv``, ``summary.csv``, ``summary.md``,
``by_<factor>.csv``/``.md``, ``curves.png`` (validation force RMSE against epoch and against
training time, one line per run, coloured by group: RLEKF vs Adam in ``optimizer_compare``) and
``summary.png``.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlekf.runs import (
    VAL_F,
    ValPoint,
    best,
    dead_time,
    format_mean_std,
    initial_point,
    mean_std,
    reach,
    read_metrics_csv,
    s_per_epoch,
    trained,
)

__all__ = [
    "FACTORS",
    "METRICS",
    "Run",
    "ValPoint",
    "aggregate",
    "build_report",
    "compute_targets",
    "find_job_dirs",
    "load_run",
    "main",
    "read_metrics_csv",
    "run_metrics",
]

# factors read from each job's config; shown as columns and used for the per-factor tables
FACTORS = ("optim", "data", "block_size", "init", "init_scale")

# per-run metrics, in table order: (key, header in the Markdown table)
METRICS: tuple[tuple[str, str], ...] = (
    ("final_force_rmse", "final val F RMSE (eV/Å)"),
    ("best_force_rmse", "best val F RMSE (eV/Å)"),
    ("final_energy_rmse", "final val E RMSE (eV/atom)"),
    ("best_energy_rmse", "best val E RMSE (eV/atom)"),
    ("epochs_to_target_force", "epochs to F target (stays below)"),
    ("time_to_target_force_s", "train s to F target (stays below)"),
    ("first_epochs_to_target_force", "epochs to F target (first crossing)"),
    ("epochs_to_target_energy", "epochs to E target (stays below)"),
    ("time_to_target_energy_s", "train s to E target (stays below)"),
    ("first_epochs_to_target_energy", "epochs to E target (first crossing)"),
    ("initial_force_rmse", "step-0 val F RMSE (eV/Å)"),
    ("epochs_to_half_force", "epochs until F RMSE halves (stays)"),
    ("steps_to_half_force", "optimizer steps until F RMSE halves (stays)"),
    ("epochs", "epochs"),
    ("train_s", "training time (s)"),
    ("s_per_epoch", "train s/epoch (whole epochs)"),
    ("elapsed_s", "wall-clock (s)"),
)
# shown only when some run logged a validation at step 0 (EpochSummary(initial_point=True))
DEAD_TIME_METRICS = ("initial_force_rmse", "epochs_to_half_force", "steps_to_half_force")
# metrics that are missing (not reached) for some runs: the tables also count the reached ones
TARGET_METRICS = (
    "epochs_to_target_force",
    "time_to_target_force_s",
    "first_epochs_to_target_force",
    "first_time_to_target_force_s",
    "epochs_to_target_energy",
    "time_to_target_energy_s",
    "first_epochs_to_target_energy",
    "first_time_to_target_energy_s",
    "epochs_to_half_force",
    "steps_to_half_force",
)


@dataclass
class Run:
    """One job of a multirun.

    Attributes:
        path: the job folder.
        job: its name (``hydra.job.num``).
        overrides: the job's overrides (``.hydra/overrides.yaml``).
        factors: ``optim``, ``data``, ``block_size``, ``init``, ``init_scale`` as strings.
        seed: the seed (``None`` if unknown).
        curve: validation points in logging order.
        test: ``test/*`` metrics when the run was tested.
        status: ``"ok"`` or why the run has no metrics.
    """

    path: Path
    job: str
    overrides: list[str]
    factors: dict[str, str]
    seed: int | None
    curve: list[ValPoint] = field(default_factory=list)
    test: dict[str, float] = field(default_factory=dict)
    status: str = "ok"


# ----------------------------------------------------------------------------- reading
def _load_yaml(path: Path) -> Any:
    with path.open() as fh:
        return yaml.safe_load(fh)


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return None
        cfg = cfg[part]
    return cfg


def _fmt_factor(value: Any) -> str:
    return "" if value is None else str(value)


def load_run(job_dir: str | Path) -> Run:
    """Read one job folder (overrides, config, choices, ``csv/metrics.csv``).

    Args:
        job_dir: a multirun sub-folder holding ``.hydra/``.

    Returns:
        The run; ``status`` says why ``curve`` is empty when the metrics file is missing.
    """
    job_dir = Path(job_dir)
    hyd = job_dir / ".hydra"
    overrides = [str(o) for o in (_load_yaml(hyd / "overrides.yaml") or [])]
    cfg = _load_yaml(hyd / "config.yaml") if (hyd / "config.yaml").exists() else {}
    hcfg = _load_yaml(hyd / "hydra.yaml") if (hyd / "hydra.yaml").exists() else {}
    choices = _get(hcfg, "hydra.runtime.choices") or {}
    optim = choices.get("optim") or _get(cfg, "optim.name")
    opt_cfg = _get(cfg, "optim.optimizer") or {}
    if "block_size" in opt_cfg:
        bs = opt_cfg["block_size"]
        block_size = "full" if bs is None else str(bs)
    else:
        block_size = ""
    init_target = _get(cfg, "model.init._target_") or ""
    factors = {
        "optim": _fmt_factor(optim),
        "data": _fmt_factor(choices.get("data")),
        "block_size": block_size,
        "init": _fmt_factor(choices.get("model/init") or init_target.rsplit(".", 1)[-1]),
        "init_scale": _fmt_factor(_get(cfg, "model.init.scale")),
    }
    seed = _get(cfg, "seed")
    run = Run(
        path=job_dir,
        job=job_dir.name,
        overrides=overrides,
        factors=factors,
        seed=int(seed) if seed is not None else None,
    )
    metrics = job_dir / "csv" / "metrics.csv"
    if not metrics.exists():
        found = sorted(job_dir.rglob("metrics.csv"))
        metrics = found[0] if found else metrics
    if not metrics.exists():
        run.status = "no csv/metrics.csv (run the sweep with the csv logger)"
        return run
    run.curve, run.test = read_metrics_csv(metrics)
    if not run.curve:
        run.status = f"no {VAL_F} in {metrics}"
    return run


def find_job_dirs(multirun_dir: str | Path) -> list[Path]:
    """Job folders (those holding ``.hydra/overrides.yaml``) under a multirun folder, in order."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    jobs = [p.parent.parent for p in root.glob("*/.hydra/overrides.yaml")]
    if not jobs:
        jobs = [p.parent.parent for p in root.glob("**/.hydra/overrides.yaml")]
    return sorted(jobs, key=lambda p: (0, int(p.name), "") if p.name.isdigit() else (1, 0, str(p)))


# ----------------------------------------------------------------------------- metrics
def compute_targets(
    runs: Iterable[Run], target_factor: float = 1.2
) -> dict[str, tuple[float, float]]:
    """Target RMSEs per data set: ``target_factor`` × the best value reached by any run.

    Returns:
        ``{data: (energy_target, force_target)}`` (NaN where no run has the quantity).
    """
    curves: dict[str, list[list[ValPoint]]] = {}
    for run in runs:
        if run.curve:
            curves.setdefault(run.factors.get("data", ""), []).append(run.curve)
    return {
        d: (target_factor * best(cs, "energy"), target_factor * best(cs, "force"))
        for d, cs in curves.items()
    }


def _nanmin(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return min(vals) if vals else math.inf


def run_metrics(run: Run, energy_target: float, force_target: float) -> dict[str, float]:
    """Final/best validation RMSEs and epochs/training seconds to the targets of one run.

    ``epochs_to_target_*`` / ``time_to_target_*_s``: training epochs done (fractional for a
    truncated last epoch) and training seconds (``time/train_s``; the wall-clock for older
    logs, ``clock`` says which) at the first validation from which the RMSE stays ≤ the target
    to the end of the run; ``first_*``: at its first crossing. Not reached: NaN. A run with
    no validation after its step-0 point (stopped before it, e.g. diverged) has only
    ``initial_force_rmse``; everything else is NaN.
    ``s_per_epoch``: training seconds per whole epoch (:func:`rlekf.runs.s_per_epoch`).
    """
    nan = math.nan
    if not run.curve:
        return {key: nan for key, _ in METRICS}
    start = initial_point(run.curve)
    if not trained(run.curve):  # stopped (e.g. diverged) before its first validation
        out = {key: nan for key, _ in METRICS}
        out["initial_force_rmse"] = start.force_rmse if start else nan
        return out
    last = run.curve[-1]
    out: dict[str, float] = {
        "final_force_rmse": last.force_rmse,
        "best_force_rmse": min(p.force_rmse for p in trained(run.curve)),
        "final_energy_rmse": last.energy_rmse,
        "best_energy_rmse": _nanmin(p.energy_rmse for p in trained(run.curve)),
        "epochs": last.epochs,
        "train_s": last.train_time,
        "s_per_epoch": s_per_epoch(run.curve),
        "elapsed_s": last.time_s,
    }
    if math.isinf(out["best_energy_rmse"]):
        out["best_energy_rmse"] = nan
    for quantity, target in (("force", force_target), ("energy", energy_target)):
        for criterion, prefix in (("stay", ""), ("first", "first_")):
            hit = reach(run.curve, quantity, target, criterion)
            out[f"{prefix}epochs_to_target_{quantity}"] = hit.epochs if hit else nan
            out[f"{prefix}time_to_target_{quantity}_s"] = hit.train_time if hit else nan
    out["initial_force_rmse"] = start.force_rmse if start else nan
    half = dead_time(run.curve, "force") if start else None
    out["epochs_to_half_force"] = half.epochs if half else nan
    out["steps_to_half_force"] = half.optimizer_steps if half else nan
    for key, value in run.test.items():
        out[key] = value
    return out


def override_key(override: str) -> str:
    """``"+model/init=x"`` -> ``"model/init"``."""
    return override.split("=", 1)[0].lstrip("+~")


def varying_overrides(runs: Sequence[Run], exclude: Iterable[str] = ("seed",)) -> list[str]:
    """Override keys whose value differs between runs (``seed`` excluded), in first-seen order."""
    exclude = set(exclude)
    present = [{override_key(o): o for o in run.overrides} for run in runs]
    keys = dict.fromkeys(k for p in present for k in p)  # first-seen order
    return [k for k in keys if k not in exclude and len({p.get(k, "") for p in present}) > 1]


def group_label(run: Run, keys: Sequence[str]) -> str:
    """The run's overrides of ``keys`` joined by commas (``"all"`` if none)."""
    present = {override_key(o): o for o in run.overrides}
    parts = [present[k] for k in keys if k in present]
    return ",".join(parts) if parts else "all"


def aggregate(
    rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], str], metrics: Sequence[str]
) -> list[dict[str, Any]]:
    """Mean, sample std and count of ``metrics`` over rows grouped by ``key(row)``.

    Args:
        rows: per-run rows (``runs.csv``), each with the metric values.
        key: the group of a row.
        metrics: metric names.

    Returns:
        One dict per group in first-seen order: ``group``, ``n_runs``, the factor columns
        shared by all rows of the group (others left empty), then ``<m>_mean``, ``<m>_std``
        and ``<m>_n`` (the number of non-NaN values, e.g. runs that reached a target).
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    out = []
    for name, members in groups.items():
        agg: dict[str, Any] = {"group": name, "n_runs": len(members)}
        for f in FACTORS:
            vals = {m.get(f, "") for m in members}
            agg[f] = vals.pop() if len(vals) == 1 else ""
        for m in metrics:
            mean, std, n = mean_std([float(r.get(m, math.nan)) for r in members])
            agg[f"{m}_mean"], agg[f"{m}_std"], agg[f"{m}_n"] = mean, std, n
        out.append(agg)
    return out


# ----------------------------------------------------------------------------- output
def _write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else repr(value)
    return value


def markdown_table(rows: Sequence[dict[str, Any]], factors: Sequence[str]) -> str:
    """A Markdown table of aggregated rows: group, factors, runs, then mean ± std per metric
    (the dead-time columns only when some run has a step-0 validation)."""
    metrics = [
        (m, h)
        for m, h in METRICS
        if m not in DEAD_TIME_METRICS or any(r.get("initial_force_rmse_n", 0) for r in rows)
    ]
    head = ["group", *factors, "runs", *(h for _, h in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [str(row["group"]), *(str(row.get(f, "")) for f in factors), str(row["n_runs"])]
        for m, _ in metrics:
            n = row[f"{m}_n"] if m in TARGET_METRICS else None
            cells.append(format_mean_std(row[f"{m}_mean"], row[f"{m}_std"], n, row["n_runs"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_curves(runs: Sequence[Run], labels: Sequence[str], path: Path) -> None:
    """Validation force RMSE against epoch and against training time (the wall-clock for runs
    logged without ``time/train_s``), a row per data set."""
    datas = sorted({r.factors["data"] for r in runs})
    groups = list(dict.fromkeys(labels))
    fig, axes = _figure(len(datas), 2, (11, 3.8 * len(datas)))
    from matplotlib import colormaps, ticker

    cmap = colormaps["tab10" if len(groups) <= 10 else "tab20"]
    seen: set[tuple[str, str]] = set()
    for run, label in zip(runs, labels, strict=True):
        row = datas.index(run.factors["data"])
        color = cmap(groups.index(label) % cmap.N)
        style = "--" if run.factors.get("optim", "").startswith("adam") else "-"
        ys = [p.force_rmse for p in run.curve]
        first = (run.factors["data"], label) not in seen
        seen.add((run.factors["data"], label))
        epochs = [p.epochs for p in run.curve]  # fractional; 0 for a step-0 point
        for col, xs in enumerate((epochs, [p.train_time for p in run.curve])):
            axes[row][col].plot(
                xs, ys, style, marker="o", ms=3, color=color, label=label if first else None
            )
    wall = any(p.clock == "wall" for run in runs for p in run.curve)
    time_label = "training time (s)" + (" (wall-clock for older logs)" if wall else "")
    for row, data in enumerate(datas):
        for col, xlabel in enumerate(("training epochs", time_label)):
            ax = axes[row][col]
            ax.set_xlabel(xlabel)
            ax.set_ylabel("val force RMSE (eV/Å)")
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.yaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
            ax.set_title(f"{data}: validation force RMSE" if data else "validation force RMSE")
            ax.grid(alpha=0.3)
        axes[row][1].legend(fontsize=7, loc="best")
    fig.savefig(path, dpi=110)


def plot_summary(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Bars of best validation force and energy RMSE per group (mean ± std over seeds)."""
    fig, axes = _figure(1, 2, (11, 1.2 + 0.35 * max(len(rows), 2)))
    names = [str(r["group"]) for r in rows]
    for ax, (metric, title) in zip(
        axes[0],
        (
            ("best_force_rmse", "best val force RMSE (eV/Å)"),
            ("best_energy_rmse", "best val energy RMSE (eV/atom)"),
        ),
        strict=True,
    ):
        means = [r[f"{metric}_mean"] for r in rows]
        errs = [0.0 if math.isnan(r[f"{metric}_std"]) else r[f"{metric}_std"] for r in rows]
        ax.barh(range(len(rows)), means, xerr=errs, color="tab:blue", alpha=0.7, capsize=3)
        ax.set_yticks(range(len(rows)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(title)
        ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=110)


@dataclass
class Report:
    """What :func:`build_report` produced.

    Attributes:
        runs: per-run rows (``runs.csv``).
        summary: per-group rows (``summary.csv``).
        by_factor: per-factor rows (``by_<factor>.csv``) for factors that vary.
        targets: ``{data: (energy_target, force_target)}``.
        files: the files written.
    """

    runs: list[dict[str, Any]]
    summary: list[dict[str, Any]]
    by_factor: dict[str, list[dict[str, Any]]]
    targets: dict[str, tuple[float, float]]
    files: list[Path]


def build_report(
    multirun_dir: str | Path,
    out_dir: str | Path | None = None,
    target_factor: float = 1.2,
    plots: bool = True,
) -> Report:
    """Read every run of a multirun folder and write the tables and plots.

    Args:
        multirun_dir: the sweep's folder (``hydra.sweep.dir``).
        out_dir: where to write (default ``<multirun_dir>/report``).
        target_factor: target RMSE = this × the best RMSE of any run on the same data set.
        plots: also write ``curves.png`` and ``summary.png``.

    Returns:
        The tables and the written files.

    Raises:
        FileNotFoundError: no job folder, or no run with validation metrics.
    """
    multirun_dir = Path(multirun_dir)
    jobs = find_job_dirs(multirun_dir)
    if not jobs:
        raise FileNotFoundError(f"{multirun_dir}: no job folders with .hydra/overrides.yaml")
    runs = [load_run(j) for j in jobs]
    ok = [r for r in runs if r.curve]
    if not ok:
        raise FileNotFoundError(
            f"{multirun_dir}: no run has validation metrics in csv/metrics.csv ({runs[0].status})"
        )
    out = Path(out_dir) if out_dir is not None else multirun_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    targets = compute_targets(ok, target_factor)
    keys = varying_overrides(ok)
    metric_names = [m for m, _ in METRICS]
    test_names = sorted({k for r in ok for k in r.test if k.endswith("_rmse")})
    rows: list[dict[str, Any]] = []
    labels: list[str] = []
    for run in runs:
        e_t, f_t = targets.get(run.factors["data"], (math.nan, math.nan))
        label = group_label(run, keys)
        row: dict[str, Any] = {"job": run.job, "group": label, **run.factors, "seed": run.seed}
        row["status"] = run.status
        row["clock"] = run.curve[-1].clock if run.curve else ""
        row["energy_target"], row["force_target"] = e_t, f_t
        row.update(run_metrics(run, e_t, f_t))
        rows.append(row)
        if run.curve:
            labels.append(label)
    ok_rows = [r for r in rows if r["status"] == "ok"]
    summary = aggregate(ok_rows, lambda r: r["group"], [*metric_names, *test_names])
    # a factor varies when it takes several values where it applies (block_size: not for Adam)
    varying = [f for f in FACTORS if len({r[f] for r in ok_rows} - {""}) > 1]
    by_factor = {}
    if len(varying) > 1:
        for f in varying:
            by_factor[f] = aggregate(ok_rows, lambda r, f=f: f"{f}={r[f]}", metric_names)
    files = [out / "runs.csv", out / "summary.csv", out / "summary.md"]
    _write_csv(files[0], rows)
    _write_csv(files[1], summary)
    header = [
        f"# Sweep report: {multirun_dir}",
        "",
        f"{len(ok)} of {len(runs)} runs with metrics; groups differ by "
        f"{', '.join(keys) or 'nothing'}; mean ± sample std over seeds (n/N: runs that "
        "reached the target). Energies in eV/atom, forces in eV/Å. A run reaches a target at "
        "the first validation from which its RMSE stays ≤ the target to the end (first "
        "crossing: secondary columns); epochs are training epochs done (a truncated last epoch "
        "counts as the fraction it ran); times are training seconds since the start of fit "
        "(validation and checkpoint writes excluded)"
        + (
            "; runs logged without time/train_s use the wall-clock: "
            + ", ".join(r.job for r in ok if r.curve[-1].clock == "wall")
            if any(r.curve[-1].clock == "wall" for r in ok)
            else ""
        )
        + ".",
        "",
    ]
    for data, (e_t, f_t) in targets.items():
        header.append(
            f"- targets{' for ' + data if data else ''}: force ≤ {f_t:.4g} eV/Å, energy ≤ "
            f"{e_t:.4g} eV/atom ({target_factor:g} × best of any run)"
        )
    text = "\n".join(header) + "\n\n" + markdown_table(summary, varying)
    for f, table in by_factor.items():
        text += f"\n## By {f}\n\n" + markdown_table(table, [f])
        _write_csv(out / f"by_{f}.csv", table)
        (out / f"by_{f}.md").write_text(markdown_table(table, [f]))
        files += [out / f"by_{f}.csv", out / f"by_{f}.md"]
    failed = [r for r in runs if not r.curve]
    if failed:
        text += "\n## Runs without metrics\n\n" + "".join(
            f"- {r.job}: {r.status}\n" for r in failed
        )
    files[2].write_text(text)
    if plots:
        plot_curves(ok, labels, out / "curves.png")
        plot_summary(summary, out / "summary.png")
        files += [out / "curves.png", out / "summary.png"]
    return Report(runs=rows, summary=summary, by_factor=by_factor, targets=targets, files=files)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``rlekf-report <multirun dir> [--out DIR] [--target-factor 1.2]``."""
    parser = argparse.ArgumentParser(
        prog="rlekf-report",
        description="Tables (CSV, Markdown) and plots (PNG) of a Hydra sweep of rlekf-train, "
        "read from the runs' csv/metrics.csv.",
    )
    parser.add_argument("multirun_dir", type=Path, help="the sweep folder (hydra.sweep.dir)")
    parser.add_argument("--out", type=Path, default=None, help="default: <multirun_dir>/report")
    parser.add_argument(
        "--target-factor",
        type=float,
        default=1.2,
        help="target RMSE = this x the best RMSE of any run on the data set (default 1.2)",
    )
    parser.add_argument("--no-plots", action="store_true", help="tables only")
    args = parser.parse_args(argv)
    try:
        report = build_report(args.multirun_dir, args.out, args.target_factor, not args.no_plots)
    except FileNotFoundError as exc:
        print(f"rlekf-report: {exc}", file=sys.stderr)
        return 1
    print((report.files[2]).read_text())
    print("wrote " + ", ".join(str(p) for p in report.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
