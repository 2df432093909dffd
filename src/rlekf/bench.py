"""``rlekf-bench``: RLEKF vs Adam side by side, and the Kalman-update microbenchmark.

Training comparison: for each data set and seed (default 0, 1, 2), ``rlekf-train`` runs once
per optimizer (same model, data, split — so the same validation frames —, dtype and seed; only
``optim=`` differs) in a subprocess under the same budget of training time (``--clock train``,
the default: validation and checkpoint writes outside; ``--clock wall``: Lightning's
``max_time``, everything included), with the CSV logger. The
curves are read and accounted by :mod:`rlekf.runs` (shared with ``rlekf-report``): per data set
and Kalman mode against Adam, the training epochs and training seconds (validation and
checkpoint writes outside the clock; a truncated last epoch counts as the fraction it ran)
each optimizer needs until its validation force (and energy) RMSE stays below 1.2 × the best
that either reached (first crossing as a secondary column), mean ± std over seeds, the ratios
of the means with their spread (bounds both ways when one optimizer misses the target), final
RMSEs, seconds per whole epoch and the peak resident memory of each run.

Microbenchmark: time per Kalman update for the Cu and water models at several block sizes and
P dtypes, the bytes of P read and written per update (one read and one write of the stored
lower tiles: 2 × the stored bytes, rank-1 and rank-k alike), and this machine's memory
bandwidth measured in the same run (a large tensor copy), printed as achieved/bound; the
full-storage update of earlier versions (3·itemsize·Σn_i² bytes) is timed beside it. Next to
the rank-1 update it times the opt-in fused rank-k update (:meth:`RLEKF.step_k`, ``k``
measurements in one pass over P, so k times fewer bytes per measurement). ``--device cuda``
(``auto``: CUDA when available) runs the microbenchmark on the GPU (device-to-device copy as
the bound, peak GPU memory) and the training runs with ``trainer=gpu``. Presets:
``configs/bench/<preset>.yaml``.

Adam's learning-rate schedule decays over ``trainer.max_epochs``. ``--adam-epochs auto``
(the default) times a short Adam calibration run per data set and gives Adam the number of
epochs that fits the budget (timed on the budget's clock), so that its full schedule runs in
the same training time as the Kalman runs; the report gives each run's plan error (epochs
run / planned − 1). ``preset`` uses the preset's epochs (tuned on a 2-core CPU).

Results go to ``bench/results/<date>-<tag>-<name>.{md,csv}`` and ``...-curves.png``
(``--tag``, default: the host name; ``--name``, default: the preset, ``micro`` for
``--no-train``).

``rlekf-bench --profile`` (``make profile``) profiles training steps instead: see
:mod:`rlekf.profile`.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import itertools
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from rlekf.runs import (
    CRITERIA,
    Ratio,
    ValPoint,
    best,
    mean_std,
    ratio_of_means,
    reach,
    read_metrics_csv,
    s_per_epoch,
)
from rlekf.utils.dtypes import float_dtype

__all__ = [
    "PRESETS",
    "load_presets",
    "RunResult",
    "adam_epochs_for_budget",
    "calibration_error",
    "main",
    "microbench",
    "parse_adam_epochs",
    "summarize",
    "with_max_epochs",
]


def load_presets(directory: Path | str | None = None) -> dict[str, dict[str, Any]]:
    """The benchmark presets: ``configs/bench/<name>.yaml`` (``budget_s``: training seconds per
    run; ``micro_blocks``: block sizes of the microbenchmark; ``datasets``: row name ->
    ``{"all": [...], "adam": [...]}`` Hydra overrides, and optionally ``"data"``: the data preset
    (``configs/data/<data>.yaml``; default: the row name), so that one data set can appear in
    several rows, e.g. at several batch sizes).

    ``"targets"`` (optional): absolute validation-RMSE targets fixed before the runs,
    ``{"force": eV/Å, "energy": eV/atom}`` (either or both), reported beside the relative one.

    Raises:
        ValueError: A preset file without those keys (naming the file).
    """
    from rlekf.utils.instantiate import CONFIG_DIR

    root = Path(directory) if directory is not None else Path(CONFIG_DIR) / "bench"
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(root.glob("*.yaml")):
        with path.open() as f:
            preset = yaml.safe_load(f)
        if not isinstance(preset, dict) or not {"budget_s", "micro_blocks", "datasets"} <= set(
            preset
        ):
            raise ValueError(f"{path}: a bench preset needs budget_s, micro_blocks and datasets")
        for name, over in preset["datasets"].items():
            if not isinstance(over, dict) or set(over) - {"all", "adam", "data", "targets"}:
                raise ValueError(
                    f"{path}: datasets.{name} takes the lists 'all' and 'adam', a 'data' name "
                    "and 'targets'"
                )
            entry: dict[str, Any] = {k: list(over.get(k) or []) for k in ("all", "adam")}
            entry["data"] = str(over.get("data") or name)
            entry["targets"] = _fixed_targets(over.get("targets"), f"{path}: datasets.{name}")
            preset["datasets"][name] = entry
        out[path.stem] = preset
    return out


def _fixed_targets(value: Any, where: str) -> dict[str, float]:
    """A preset row's ``targets``: ``{"force": x, "energy": y}`` with positive finite values."""
    if value is None:
        return {}
    if not isinstance(value, dict) or set(value) - {"force", "energy"}:
        raise ValueError(f"{where}: targets takes 'force' (eV/Å) and 'energy' (eV/atom)")
    out = {}
    for q, v in value.items():
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not (x > 0 and math.isfinite(x)):
            raise ValueError(f"{where}: targets.{q} must be a positive number, got {v!r}")
        out[q] = x
    return out


PRESETS: dict[str, dict[str, Any]] = load_presets()
OPTIMS = ("rlekf", "rlekf_fused", "adam")
KALMAN = ("rlekf", "rlekf_fused")
TARGET_FACTOR = 1.2


@dataclass
class RunResult:
    """The validation curve of one training run (points read by :mod:`rlekf.runs`)."""

    dataset: str
    optim: str
    curve: list[ValPoint] = field(default_factory=list)
    seed: int = 0
    peak_rss_mib: float = float("nan")
    wall_s: float = float("nan")
    returncode: int = 0
    peak_gpu_mib: float = float("nan")
    max_epochs: int | None = None  # the trainer.max_epochs it ran with (Adam's schedule)
    load_before: float = float("nan")  # 1-minute load average when the run started
    load_after: float = float("nan")  # ... and when it ended (§6: time on an idle machine)
    other_cpu_s: float = float("nan")  # CPU seconds used by other processes during the run

    @property
    def epochs(self) -> list[float]:
        """Training epochs done at each validation (fractional for a truncated epoch)."""
        return [p.epochs for p in self.curve]

    @property
    def elapsed_s(self) -> list[float]:
        """Wall-clock since the start of fit at each validation (everything included)."""
        return [p.time_s for p in self.curve]

    @property
    def train_s(self) -> list[float]:
        """Training seconds at each validation (validation and checkpoints excluded)."""
        return [p.train_time for p in self.curve]

    def clock_s(self, clock: str) -> list[float]:
        """Seconds at each validation on a budget's ``clock``: ``train`` or ``wall``."""
        return self.train_s if check_clock(clock) == "train" else self.elapsed_s

    @property
    def force_rmse(self) -> list[float]:
        return [p.force_rmse for p in self.curve]

    @property
    def energy_rmse(self) -> list[float]:
        return [p.energy_rmse for p in self.curve]


def _pair_side(runs: list[RunResult], quantity: str, target: float, criterion: str):
    """Per seed: (epochs to target or None, epochs run, seconds to target or None, seconds run)."""
    out = []
    for r in runs:
        hit = reach(r.curve, quantity, target, criterion)
        last = r.curve[-1]
        out.append(
            (
                hit.epochs if hit else None,
                last.epochs,
                hit.train_time if hit else None,
                last.train_time,
            )
        )
    return out


def _side_stats(side, index: int) -> tuple[float, float, int]:
    return mean_std([v[index] for v in side if v[index] is not None])


def _target_columns(
    row: dict[str, Any],
    prefix: str,
    adam: list[RunResult],
    kalr: list[RunResult],
    q: str,
    target: float,
) -> None:
    """Row columns ``<prefix>_<crit>_...`` for one target: epochs / seconds to it per side
    (mean, std, seeds that reached it, run totals) and the Adam / Kalman ratios."""
    for crit in CRITERIA:
        a_side = _pair_side(adam, q, target, crit)
        k_side = _pair_side(kalr, q, target, crit)
        for who, side in (("adam", a_side), ("kal", k_side)):
            for what, i in (("epochs", 0), ("s", 2)):
                m, sd, n = _side_stats(side, i)
                key = f"{prefix}_{crit}_{who}_{what}"
                row[key], row[f"{key}_std"], row[f"{key}_n"] = m, sd, n
            row[f"{prefix}_{crit}_{who}_epochs_run"] = mean_std([v[1] for v in side])[0]
            row[f"{prefix}_{crit}_{who}_s_run"] = mean_std([v[3] for v in side])[0]
        for what, i, j in (("epoch", 0, 1), ("time", 2, 3)):
            row[f"{prefix}_{crit}_{what}_ratio"] = ratio_of_means(
                [v[i] for v in a_side],
                [v[j] for v in a_side],
                [v[i] for v in k_side],
                [v[j] for v in k_side],
            )


def _unpaired_note(runs: list[RunResult], ds: str) -> str:
    """Why data set ``ds`` has no Adam–Kalman pair: a run without a curve, or a side not run."""
    here = [r for r in runs if r.dataset == ds]
    failed = sorted({f"{r.optim} seed {r.seed}" for r in here if not r.curve})
    if failed:
        return f"a run failed or logged no epoch ({', '.join(failed)})"
    ran = sorted({r.optim for r in here})
    missing = "Adam" if "adam" not in ran else "Kalman"
    return f"no {missing} run to pair with (ran: {', '.join(ran)})"


def summarize(
    runs: list[RunResult], fixed: dict[str, dict[str, float]] | None = None
) -> list[dict[str, Any]]:
    """One row per data set and Kalman mode against Adam, over the seeds both ran.

    Per quantity (force, energy): the target (:data:`TARGET_FACTOR` × the best validation RMSE
    that either optimizer of the pair reached in any seed), then per criterion (``stay``: the
    RMSE stays below the target to the end, the primary one; ``first``: first crossing) the
    mean ± std over seeds of the training epochs and training seconds each needed (``_n``: the
    seeds that reached it) and the Adam / Kalman ratios of the means
    (:func:`rlekf.runs.ratio_of_means`: bounds when one optimizer missed). Also final RMSEs,
    training seconds per whole epoch, epochs run and peak memory (means over seeds).

    ``fixed``: per data set absolute targets set before the runs (``{"force": eV/Å,
    "energy": eV/atom}``, from the preset's ``targets``); each gives the same columns under
    ``<q>_fixed_...`` and its value in ``<q>_fixed_target``.
    """
    fixed = fixed or {}
    rows = []
    for ds in dict.fromkeys(r.dataset for r in runs):
        ok = [r for r in runs if r.dataset == ds and r.curve]
        by: dict[str, dict[int, RunResult]] = {}
        for r in ok:
            by.setdefault(r.optim, {})[r.seed] = r
        kalmans = [k for k in KALMAN if k in by]
        if "adam" not in by or not kalmans:
            rows.append({"dataset": ds, "note": _unpaired_note(runs, ds)})
            continue
        for kal in kalmans:
            seeds = sorted(set(by["adam"]) & set(by[kal]))
            if not seeds:
                rows.append({"dataset": ds, "kalman": kal, "note": "no seed ran both"})
                continue
            adam = [by["adam"][s] for s in seeds]
            kalr = [by[kal][s] for s in seeds]
            row: dict[str, Any] = {"dataset": ds, "kalman": kal, "seeds": len(seeds)}
            row["clock"] = "train" if all(r.curve[-1].clock == "train" for r in ok) else "wall"
            for q in ("force", "energy"):
                target = TARGET_FACTOR * best([r.curve for r in (*adam, *kalr)], q)
                row[f"{q}_target"] = target
                _target_columns(row, q, adam, kalr, q, target)
                if q in fixed.get(ds, {}):
                    row[f"{q}_fixed_target"] = fixed[ds][q]
                    _target_columns(row, f"{q}_fixed", adam, kalr, q, fixed[ds][q])
            for who, rs in (("adam", adam), ("kal", kalr)):
                for key, values in (
                    ("final_force", [r.curve[-1].force_rmse for r in rs]),
                    ("final_energy", [r.curve[-1].energy_rmse for r in rs]),
                    ("best_force", [min(r.force_rmse) for r in rs]),
                    ("epochs_run", [r.curve[-1].epochs for r in rs]),
                    ("train_s", [r.curve[-1].train_time for r in rs]),
                    ("s_per_epoch", [s_per_epoch(r.curve) for r in rs]),
                    ("peak_mib", [r.peak_rss_mib for r in rs]),
                    ("peak_gpu_mib", [r.peak_gpu_mib for r in rs]),
                ):
                    m, sd, _ = mean_std(values)
                    row[f"{who}_{key}"], row[f"{who}_{key}_std"] = m, sd
            planned = {r.max_epochs for r in adam if r.max_epochs is not None}
            if planned:
                row["adam_max_epochs"] = max(planned)
            rows.append(row)
    return rows


def calibration_error(planned: int, ran: float) -> float:
    """Relative error of Adam's epoch plan: ``ran / planned - 1`` (negative: the budget cut
    its schedule short)."""
    return ran / planned - 1.0


def adam_plan_note(ds: str, seed: int, run: RunResult, budget_s: float, clock: str) -> str:
    """The report's line on how Adam's planned schedule fitted the budget: epochs run against
    planned (:func:`calibration_error`) and the seconds of the budget's ``clock`` it used (a
    schedule that ends early leaves budget unused: the plan was short)."""
    ran = run.curve[-1].epochs
    err = calibration_error(run.max_epochs, ran)
    used = run.clock_s(clock)[-1]
    end = "; its lr schedule did not reach its end" if ran < run.max_epochs else ""
    on = "training time" if clock == "train" else "wall-clock"
    return (
        f"- {ds} seed {seed}: Adam ran {ran:.3g} of its {run.max_epochs} planned epochs (plan "
        f"error {100 * err:+.0f} %{end}) in {used:.0f} s of the {budget_s:g} s budget "
        f"({100 * used / budget_s:.0f} %, {on})."
    )


def parse_adam_epochs(value: str) -> str | int:
    """``--adam-epochs``: ``"auto"``, ``"preset"`` or a positive number of epochs."""
    v = str(value).strip().lower()
    if v in ("auto", "preset"):
        return v
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(
            f"--adam-epochs: expected 'auto', 'preset' or a positive integer, got {value!r}"
        )
    return n


def adam_epochs_for_budget(
    elapsed_s: list[float], budget_s: float, safety: float = 0.9
) -> tuple[int, float]:
    """Adam's ``max_epochs`` for a budget, from a calibration run's curve.

    Args:
        elapsed_s: the clock the budget is on (``time/train_s`` for a training-time budget,
            ``time/elapsed_s`` for a wall-clock one; seconds since the start of fit) at the
            end of each epoch of the calibration run (at least two epochs).
        budget_s: the budget of the real run on that clock.
        safety: fraction of the time left after the first epoch's extra cost that the
            epochs may fill, so that the whole schedule ends before the budget stops it.

    Returns:
        ``(max_epochs, seconds per epoch)``; the first epoch is left out of the rate (warm-up)
        and its extra cost over the rate is taken off the budget.

    Raises:
        ValueError: fewer than two epochs, or a non-increasing clock.
    """
    if len(elapsed_s) < 2:
        raise ValueError(f"need at least two calibration epochs, got {len(elapsed_s)}")
    s_per_epoch = (elapsed_s[-1] - elapsed_s[0]) / (len(elapsed_s) - 1)
    if not s_per_epoch > 0:
        raise ValueError(f"calibration clock does not increase: {elapsed_s}")
    overhead = max(elapsed_s[0] - s_per_epoch, 0.0)
    epochs = math.floor(safety * (budget_s - overhead) / s_per_epoch)
    return max(epochs, 1), s_per_epoch


def with_max_epochs(overrides: list[str], epochs: int) -> list[str]:
    """``overrides`` with every ``trainer.max_epochs=`` replaced by ``epochs``."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("trainer.max_epochs=")]
    return [*kept, f"trainer.max_epochs={int(epochs)}"]


def max_epochs_of(overrides: list[str]) -> int | None:
    """The last ``trainer.max_epochs=N`` in ``overrides`` (None if there is none)."""
    found = None
    for o in overrides:
        if o.lstrip("+").startswith("trainer.max_epochs="):
            found = int(o.split("=", 1)[1])
    return found


def _dhms(seconds: int) -> str:
    """Lightning's ``max_time`` string DD:HH:MM:SS."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return f"{d:02d}:{h:02d}:{m:02d}:{s:02d}"


def busy_cpu_s() -> float:
    """CPU seconds all processes of this machine have used since boot (``/proc/stat``: user,
    nice, system, irq, softirq, steal over all CPUs); NaN where that file does not exist."""
    try:
        with open("/proc/stat") as fh:
            fields = fh.readline().split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    except (OSError, ValueError):
        return math.nan
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


#: ``clock="train"``: the wall-clock cap (Lightning ``max_time``) beside the training-time
#: budget, ``WALL_CAP_FACTOR`` × budget + ``WALL_CAP_EXTRA_S`` (validation, checkpoint writes)
WALL_CAP_FACTOR, WALL_CAP_EXTRA_S = 3, 600

#: what a run's budget is on: its training time (``EpochSummary(max_train_s)``; validation
#: and checkpoint writes outside) or its wall-clock (Lightning ``max_time``)
BUDGET_CLOCKS = ("train", "wall")


def check_clock(clock: str) -> str:
    """``clock`` if it is one of :data:`BUDGET_CLOCKS`, else ``ValueError`` naming them."""
    if clock not in BUDGET_CLOCKS:
        raise ValueError(f"budget clock must be one of {BUDGET_CLOCKS}, got {clock!r}")
    return clock


def budget_overrides(budget_s: int, clock: str = "train") -> list[str]:
    """The Hydra overrides that stop a run after ``budget_s`` seconds on ``clock``.

    ``train``: ``EpochSummary``'s ``max_train_s`` (every optimizer gets the same training
    time whatever its validation costs) under a wall-clock cap; ``wall``: ``max_time``.
    """
    if check_clock(clock) == "wall":
        return [f"+trainer.max_time={_dhms(budget_s)}"]
    cap = WALL_CAP_FACTOR * int(budget_s) + WALL_CAP_EXTRA_S
    return [
        f"callbacks.epoch_summary.max_train_s={int(budget_s)}",
        f"+trainer.max_time={_dhms(cap)}",
    ]


SELECTIONS = ("force", "score")


def selection_overrides(select: str, targets: dict[str, float] | None, dataset: str) -> list[str]:
    """The Hydra overrides that choose what picks a run's best checkpoint.

    ``force``: the config's default (validation force RMSE), no override. ``score``: the
    validation ``score`` (energy RMSE / energy target + force RMSE / force target, the preset's
    fixed ``targets`` as scales; :func:`rlekf.training.metrics.selection_score`), so the kept
    checkpoint weighs energies too. Only the checkpoint files change: the tables read the
    whole validation curve either way.
    """
    if select not in SELECTIONS:
        raise ValueError(f"select must be one of {SELECTIONS}, got {select!r}")
    if select == "force":
        return []
    if not targets or set(targets) != {"force", "energy"}:
        raise ValueError(
            f"--select score needs the preset's targets for {dataset} (force and energy), "
            f"got {targets!r}"
        )
    return [
        f"task.score_scales={{energy_rmse: {targets['energy']!r}, "
        f"force_rmse: {targets['force']!r}}}",
        "monitor=val/score",
    ]


def selection_note(select: str, targets: dict[str, float] | None, dataset: str) -> str | None:
    """The report line that says what picked the checkpoints (None for the default)."""
    if not selection_overrides(select, targets, dataset):
        return None
    assert targets is not None
    return (
        f"- {dataset}: best checkpoints by validation score = energy RMSE / "
        f"{targets['energy']:g} eV/atom + force RMSE / {targets['force']:g} eV/Å (`--select "
        "score`, the preset's fixed targets as scales)."
    )


def run_training(
    dataset: str,
    optim: str,
    overrides: list[str],
    budget_s: int,
    out: Path,
    seed: int = 0,
    data: str | None = None,
    clock: str = "train",
) -> RunResult:
    """Train one optimizer on one data set in a subprocess; returns its validation curve.

    ``dataset`` names the row; ``data`` is the data preset (default: ``dataset``); the run
    stops after ``budget_s`` seconds of training time (``clock="train"``) or of wall-clock
    (``"wall"``), see :func:`budget_overrides`.
    """
    out.mkdir(parents=True, exist_ok=True)
    args = [
        f"data={data or dataset}",
        f"optim={optim}",
        "logger=csv",
        "test=false",
        "extras.print_config=false",
        f"seed={seed}",
        "trainer.max_epochs=100000",
        # the budget binds even inside the first epoch (the default min_epochs=1 would run a
        # whole epoch past it); the cut epoch counts as the fraction it ran
        "trainer.min_epochs=0",
        *budget_overrides(budget_s, clock),
        "~callbacks.rich_progress_bar",
        "~callbacks.parity_plots",
        f"hydra.run.dir={out}",
        *overrides,
    ]
    code = (
        "import resource, runpy, sys\n"
        f"sys.argv = ['rlekf-train', *{args!r}]\n"
        "try:\n"
        "    runpy.run_module('rlekf.train', run_name='__main__')\n"
        "finally:\n"
        "    print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
        "    _t = sys.modules.get('torch')\n"
        "    if _t is not None and _t.cuda.is_initialized():\n"
        "        print('PEAK_GPU_MIB', _t.cuda.max_memory_allocated() / 2**20)\n"
    )
    load_before = os.getloadavg()[0]
    busy0, child0 = busy_cpu_s(), _children_cpu_s()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    other = (busy_cpu_s() - busy0) - (_children_cpu_s() - child0)
    result = RunResult(
        dataset,
        optim,
        seed=seed,
        wall_s=time.perf_counter() - t0,
        returncode=proc.returncode,
        max_epochs=max_epochs_of(overrides),
        load_before=load_before,
        load_after=os.getloadavg()[0],
        other_cpu_s=other,
    )
    (out / "bench_stdout.log").write_text(proc.stdout + "\n" + proc.stderr)
    for line in proc.stdout.splitlines():
        if line.startswith("PEAK_RSS_KB"):
            result.peak_rss_mib = int(line.split()[1]) / 1024
        elif line.startswith("PEAK_GPU_MIB"):
            result.peak_gpu_mib = float(line.split()[1])
    metrics = out / "csv" / "metrics.csv"
    if metrics.exists():
        result.curve = read_metrics_csv(metrics)[0]
    return result


# ---------------------------------------------------------------------------- microbenchmark
def resolve_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA when available, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("rlekf-bench: --device cuda, but torch sees no CUDA device")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn, repeats: int, device: torch.device) -> float:
    """Median wall-clock of ``fn()`` (device work included: synchronized around each call)."""
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def measure_bandwidth(
    n_bytes: int | None = None, repeats: int = 5, device: torch.device | str = "cpu"
) -> float:
    """Copy bandwidth in bytes/s (read + write counted) of a large float64 tensor copy.

    On CUDA a device-to-device copy (default 2 GiB), synchronized around each repeat; best of
    ``repeats``.
    """
    device = torch.device(device)
    if n_bytes is None:
        n_bytes = (2048 if device.type == "cuda" else 512) * 2**20
    src = torch.ones(n_bytes // 8, dtype=torch.float64, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    del src, dst
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return 2 * n_bytes / min(times)


# name -> (type_map, sel, embedding, fitting) of the microbenchmark's models
MICRO_MODELS: dict[str, tuple[list[str], list[int], tuple[int, ...], tuple[int, ...]]] = {
    "Cu": (["Cu"], [100], (25, 25, 25), (50, 50, 50)),
    "H2O": (["O", "H"], [46, 92], (25, 25, 25), (50, 50, 50)),
    # DeePMD-kit's default se_e2_a water model, ~1.03 M parameters
    "H2O-deepmd": (["O", "H"], [46, 92], (25, 50, 100), (240, 240, 240)),
}


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def _time_full_path(sizes, p_dtype, repeats, device, gen) -> float:
    """Seconds per rank-1 update of the full-storage path of earlier versions (dense P_i,
    ``mv`` then one fused ``addr_`` per block: :func:`rlekf.optim.rlekf_update`)."""
    from rlekf.optim import rlekf_update

    dt = float_dtype(p_dtype)
    P = [torch.eye(n, dtype=dt, device=device) for n in sizes]
    H = [(torch.randn(n, generator=gen, dtype=dt) * 1e-3).to(device) for n in sizes]
    work = [torch.empty(n, dtype=dt, device=device) for n in sizes]

    def run(P=P, H=H, work=work):
        rlekf_update(None, P, H, 1e-3, 0.999, out=work)

    for _ in range(2):
        run()
    return _median_time(run, repeats, device)


def microbench(
    block_sizes: list[int],
    repeats: int | None = None,
    device: torch.device | str = "cpu",
    k: int = 5,
    p_dtypes: tuple[str, ...] | None = None,
    models: tuple[str, ...] = ("Cu", "H2O"),
    tiles: tuple[int | None, ...] = (None,),
    full: bool = True,
    kernels: tuple[str, ...] = ("auto",),
) -> list[dict[str, Any]]:
    """Time per RLEKF update of a whole model's covariance, against the full-storage path.

    One row per model, block size, P dtype and tile edge: :class:`~rlekf.optim.RLEKF` as it
    is (rank-1, and with ``k > 0`` the fused rank-``k`` :meth:`~rlekf.optim.RLEKF.step_k`,
    ``rankk_*`` columns). It reads and writes the stored lower tiles of P once per update:
    ``2 * p_bytes`` moved, compared with the copy bandwidth measured in the same run. With
    ``full`` the full-storage path of earlier versions (``3·itemsize·Σn²`` bytes) is timed
    beside it on the same blocks (``full_*`` columns, ``speedup_vs_full``); it needs
    ``Σn²`` elements of memory. On CUDA every timing is synchronized and ``peak_gpu_mib`` is
    the peak allocated GPU memory of the row. Periodic symmetrization is off.

    Args:
        block_sizes: RLEKF ``block_size`` values.
        repeats: timed updates per row (median); default 5 on the CPU, 20 on CUDA.
        device: where the model, P and the gradients live.
        k: measurements per fused update (0: no rank-k timing).
        p_dtypes: dtypes of P (default float64 and float32).
        models: keys of :data:`MICRO_MODELS`.
        tiles: tile edges (``None``: the optimizer's default).
        full: also time the full-storage path.
        kernels: RLEKF ``kernel`` values (``"fused"``, ``"torch"``, ``"auto"``), one row each.
    """
    from rlekf.models import DeepPotential
    from rlekf.optim import RLEKF

    device = torch.device(device)
    cuda = device.type == "cuda"
    if repeats is None:
        repeats = 20 if cuda else 5
    if p_dtypes is None:
        p_dtypes = ("float64", "float32")
    rows = []
    bandwidth = measure_bandwidth(device=device)
    for name in models:
        type_map, sel, emb, fit = MICRO_MODELS[name]
        model = DeepPotential(type_map, sel=sel, embedding=emb, fitting=fit).to(device)
        params = list(model.parameters())
        n_total = sum(p.numel() for p in params)
        gen = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = (torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3).to(device)
        for p_dtype in p_dtypes:
            for bs in block_sizes:
                t_full = None
                for tile, kernel in itertools.product(tiles, kernels):
                    if cuda:
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    extra = {} if tile is None else {"tile": tile}
                    opt = RLEKF(
                        params,
                        block_size=bs,
                        p_dtype=p_dtype,
                        symmetrize_every=0,
                        kernel=kernel,
                        **extra,
                    )
                    sizes = opt.block_sizes
                    for _ in range(2):
                        opt.step(error=1e-3)  # allocate P (and warm up the kernels)
                    t = _median_time(lambda opt=opt: opt.step(error=1e-3), repeats, device)
                    moved = 2 * opt.p_bytes  # one read + one write of the stored triangle
                    row: dict[str, Any] = {
                        "model": name,
                        "n_params": n_total,
                        "block_size": bs,
                        "n_blocks": len(sizes),
                        "tile": opt.tile,
                        "kernel": opt.kernel,
                        "p_gib": opt.p_bytes / 2**30,
                        "ms_per_update": 1e3 * t,
                        "gb_moved": moved / 1e9,
                        "achieved_gbs": moved / t / 1e9,
                        "bound_gbs": bandwidth / 1e9,
                        "achieved_over_bound": moved / t / bandwidth,
                        "device": device.type,
                        "p_dtype": p_dtype,
                    }
                    if k > 0:
                        rows_h = (
                            torch.randn(k, n_total, generator=gen, dtype=params[0].dtype) * 1e-3
                        ).to(device)
                        errs = torch.full((k,), 1e-3, dtype=torch.float64, device=device)
                        for _ in range(2):
                            opt.step_k(errs, rows_h)  # warm-up (workspaces, kernels)
                        tk = _median_time(
                            lambda opt=opt, e=errs, h=rows_h: opt.step_k(e, h), repeats, device
                        )
                        row.update(
                            {
                                "rankk_k": k,
                                "rankk_ms_per_update": 1e3 * tk,
                                "rankk_ms_per_measurement": 1e3 * tk / k,
                                "rankk_achieved_gbs": moved / tk / 1e9,
                                "rankk_achieved_over_bound": moved / tk / bandwidth,
                                "rankk_speedup_per_measurement": t * k / tk,
                            }
                        )
                        del rows_h, errs
                    if cuda:
                        row["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
                    else:
                        row["peak_rss_gib"] = _peak_rss_gib()
                    del opt
                    if full and t_full is None:
                        t_full = _time_full_path(sizes, p_dtype, repeats, device, gen)
                    if t_full is not None:
                        full_moved = 3 * float_dtype(p_dtype).itemsize * sum(n * n for n in sizes)
                        row.update(
                            {
                                "full_ms_per_update": 1e3 * t_full,
                                "full_achieved_over_bound": full_moved / t_full / bandwidth,
                                "speedup_vs_full": t_full / t,
                            }
                        )
                    rows.append(row)
                    print(
                        f"[bench] micro {name} bs={bs} {p_dtype} tile={row['tile']} "
                        f"kernel={row['kernel']} "
                        f"{device.type}: {row['ms_per_update']:.2f} ms/update "
                        f"({row['achieved_over_bound']:.2f} of the bound)"
                        + (f", full path {1e3 * t_full:.2f} ms" if t_full is not None else "")
                        + (f", rank-{k} {row['rankk_ms_per_update']:.2f} ms" if k > 0 else ""),
                        flush=True,
                    )
        for p in params:
            p.grad = None
        del model, params
    return rows


# ---------------------------------------------------------------------------- output
def machine_name(device: torch.device | str | None = None) -> str:
    """Cores, CPU model, the GPU (named as used when ``device`` is CUDA) and torch."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev_type = torch.device(device).type if device is not None else None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
        if dev_type == "cuda":
            props = torch.cuda.get_device_properties(0)
            gpu = (
                f"GPU {gpu} ({props.total_memory / 2**30:.0f} GiB, "
                f"{props.multi_processor_count} SMs; used for training and the microbenchmark)"
            )
        elif dev_type == "cpu":
            gpu = f"{gpu} (not used)"
    else:
        gpu = "no GPU"
    cuda = f" (CUDA {torch.version.cuda})" if dev_type == "cuda" and torch.version.cuda else ""
    return f"{os.cpu_count()} cores, {cpu}, {gpu}, torch {torch.__version__}{cuda}"


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "never"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else format(x, spec)
    return str(x)


def _csv_value(value: Any) -> Any:
    """A ratio as its text (``"2.1 ± 0.3×"``, ``"≥ 1.5×"``), floats as they are."""
    return str(value) if isinstance(value, Ratio) else value


def _mean_cell(row: dict[str, Any], key: str, spec: str) -> str:
    """``mean ± std`` of a summary value (``spec`` for both)."""
    m, sd = row.get(key, math.nan), row.get(f"{key}_std", math.nan)
    if math.isnan(m):
        return "nan"
    return format(m, spec) if math.isnan(sd) else f"{format(m, spec)} ± {format(sd, spec)}"


def _reach_cell(row: dict[str, Any], key: str, what: str, spec: str) -> str:
    """Epochs (``what="epochs"``) or seconds (``"s"``) to a target: mean ± std over the seeds
    that reached it, ``(n/N)`` when not all did, ``never (ran x)`` when none did."""
    n, of = row[f"{key}_{what}_n"], row["seeds"]
    if n == 0:
        if what == "s":
            return f"never (ran {row[f'{key}_s_run']:.0f} s)"
        return f"never (ran {row[f'{key}_epochs_run']:.3g} epochs)"
    m, sd = row[f"{key}_{what}"], row[f"{key}_{what}_std"]
    text = format(m, spec) if math.isnan(sd) else f"{format(m, spec)} ± {format(sd, spec)}"
    return text + (f" ({n}/{of})" if n < of else "")


def _ms(x: float) -> str:
    """Milliseconds: one decimal from 10 ms on (CPU-scale), else three significant digits."""
    return f"{x:.1f}" if x >= 10 else f"{x:.3g}"


def write_report(
    out_dir: Path,
    preset: str,
    budget: int,
    runs: list[RunResult],
    rows: list[dict[str, Any]],
    micro: list[dict[str, Any]],
    *,
    tag: str | None = None,
    device: torch.device | str | None = None,
    notes: list[str] | None = None,
    budget_clock: str = "train",
) -> Path:
    """Markdown + CSV + PNG learning curves; returns the Markdown path.

    Files: ``<out_dir>/<date>-<tag>-<preset>.md`` (``tag``: default the host name), ``.csv``
    (summary rows), ``-curves.json`` and ``-curves.png`` (when training ran) and
    ``-micro.csv`` (when the microbenchmark ran; ``.csv`` when only it ran). ``notes`` are
    extra lines printed under the training table (e.g. how Adam's epochs were chosen).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = _dt.date.today().isoformat()
    host = tag or platform.node() or "host"
    base = out_dir / f"{stamp}-{host}-{preset}"
    trained = bool(runs or rows)
    if trained:
        with open(f"{base}.csv", "w", newline="") as fh:
            keys = sorted({k for r in rows for k in r})
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows({k: _csv_value(v) for k, v in r.items()} for r in rows)
        with open(f"{base}-curves.json", "w") as fh:
            json.dump([dataclasses.asdict(r) for r in runs], fh)
        _plot(runs, Path(f"{base}-curves.png"))
    if micro:  # microbenchmark only: the table is the report's CSV
        with open(f"{base}-micro.csv" if trained else f"{base}.csv", "w", newline="") as fh:
            keys = list(dict.fromkeys(k for m in micro for k in m))
            writer = csv.DictWriter(fh, fieldnames=keys)
            writer.writeheader()
            writer.writerows(micro)
    lines = [
        f"# rlekf-bench `{preset}` — {stamp}",
        "",
        f"Machine: {machine_name(device)}.",
        "",
    ]
    gpu_col = any(math.isfinite(r.get("adam_peak_gpu_mib", math.nan)) for r in rows)
    if trained:
        clock = (
            "training time only (validation and checkpoint writes outside the clock)"
            if all(r.get("clock", "train") == "train" for r in rows)
            else "wall-clock for runs logged without `time/train_s` (validation and "
            "checkpoints included)"
        )
        budget_on = (
            "of training time per run (validation and checkpoint writes outside; "
            "`EpochSummary(max_train_s)`, under a wall-clock cap)"
            if budget_clock == "train"
            else "of wall-clock per run (Lightning `max_time`)"
        )
        lines += [
            f"Budget {budget} s {budget_on}, one run per "
            "optimizer, data set and seed; within a seed the same model init, data, split "
            "(the same validation frames for every optimizer), dtype and sampling seed.",
            "",
            f"Target = {TARGET_FACTOR} × the best validation RMSE that Adam or that Kalman mode "
            "reached in any seed (per pair). A run reaches it at the first validation from "
            "which its RMSE **stays** below the target to the end of the run (primary; first "
            "crossing: the `first` columns). Epochs are training epochs done (a truncated last "
            f"epoch counts as the fraction it ran); seconds are {clock}; s/epoch from whole "
            "epochs only. Cells: mean ± sample std over seeds, `(n/N)` when only n of N seeds "
            "reached the target, `never (ran x)` when none did. Ratio = Adam / Kalman of the "
            "means (> 1: Kalman faster) ± its spread from the seeds' std; `≥ x`: Adam missed "
            "the target in some seed (its whole run stands in); `≤ x`: the Kalman run missed "
            "it (its whole run stands in); `–`: both missed.",
            "",
            "| data (Kalman mode) | seeds | force: epochs Adam / Kalman (ratio) | "
            "force: train s Adam / Kalman (ratio) | force first: epoch / time ratio | "
            "energy: epochs (ratio) | energy: train s (ratio) | energy first: epoch / time "
            "ratio | final force RMSE Adam / Kalman (eV/Å) | final energy RMSE Adam / Kalman "
            "(eV/atom) | train s/epoch Adam / Kalman | peak MiB Adam / Kalman |"
            + (" peak GPU MiB Adam / Kalman |" if gpu_col else ""),
            "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu_col else ""),
        ]
    for r in rows:
        if "note" in r:
            name = f"{r['dataset']} ({r['kalman']})" if "kalman" in r else r["dataset"]
            lines.append(
                f"| {name} | {r['note']} | | | | | | | | | | |" + (" |" if gpu_col else "")
            )
            continue
        cells = [f"{r['dataset']} ({r['kalman']})", str(r["seeds"])]
        for q in ("force", "energy"):
            for what, spec in (("epochs", ".3g"), ("s", ".0f")):
                sides = [_reach_cell(r, f"{q}_stay_{who}", what, spec) for who in ("adam", "kal")]
                ratio = r[f"{q}_stay_{'epoch' if what == 'epochs' else 'time'}_ratio"]
                cells.append(f"{sides[0]} / {sides[1]} ({ratio})")
            cells.append(f"{r[f'{q}_first_epoch_ratio']} / {r[f'{q}_first_time_ratio']}")
        for key, spec in (
            ("final_force", ".3g"),
            ("final_energy", ".3g"),
            ("s_per_epoch", ".1f"),
            ("peak_mib", ".0f"),
            *((("peak_gpu_mib", ".0f"),) if gpu_col else ()),
        ):
            cells.append(
                f"{_mean_cell(r, f'adam_{key}', spec)} / {_mean_cell(r, f'kal_{key}', spec)}"
            )
        lines.append("| " + " | ".join(cells) + " |")
    fixed_rows = [
        (r, q)
        for r in rows
        if "note" not in r
        for q in ("force", "energy")
        if f"{q}_fixed_target" in r
    ]
    if fixed_rows:
        lines += [
            "",
            "Absolute targets fixed before the runs (preset `targets`; validation RMSE, "
            "criteria and cells as above):",
            "",
            "| data (Kalman mode) | quantity | target | stays: epochs Adam / Kalman (ratio) | "
            "stays: train s Adam / Kalman (ratio) | first crossing: epoch / time ratio |",
            "|---|---|---|---|---|---|",
        ]
        for r, q in fixed_rows:
            unit = "eV/Å" if q == "force" else "eV/atom"
            cells = [f"{r['dataset']} ({r['kalman']})", q, f"{r[f'{q}_fixed_target']:.3g} {unit}"]
            for what, spec in (("epochs", ".3g"), ("s", ".0f")):
                sides = [
                    _reach_cell(r, f"{q}_fixed_stay_{who}", what, spec) for who in ("adam", "kal")
                ]
                ratio = r[f"{q}_fixed_stay_{'epoch' if what == 'epochs' else 'time'}_ratio"]
                cells.append(f"{sides[0]} / {sides[1]} ({ratio})")
            cells.append(
                f"{r[f'{q}_fixed_first_epoch_ratio']} / {r[f'{q}_fixed_first_time_ratio']}"
            )
            lines.append("| " + " | ".join(cells) + " |")
    if trained and notes:
        lines += ["", *notes]
    if runs:
        lines += [
            "",
            "Runs in the order they ran: 1-minute load average before / after each (it "
            "lags: the previous run's threads still show at the start) and the CPU seconds "
            "other processes used during the run (`/proc/stat` busy time minus the run's own "
            "CPU time; ≈ 0 on an idle machine):",
            "",
            "| data | optimizer | seed | wall s | load before / after | other CPU s | exit |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            lines.append(
                f"| {r.dataset} | {r.optim} | {r.seed} | {_fmt(r.wall_s, '.0f')} "
                f"| {_fmt(r.load_before, '.2f')} / {_fmt(r.load_after, '.2f')} "
                f"| {_fmt(r.other_cpu_s, '.1f')} | {r.returncode} |"
            )
    if micro:
        m0 = micro[0]
        rank_k = any("rankk_ms_per_update" in m for m in micro)
        gpu = any("peak_gpu_mib" in m for m in micro)
        extra = "p_dtype" in m0
        k = next((m["rankk_k"] for m in micro if "rankk_k" in m), None)
        where = m0.get("device", "cpu")
        lines += [
            "",
            f"Kalman update on {where} (rank-1: the paper's; rank-{k}: the fused "
            f"`RLEKF.step_k`, {k} measurements in one pass over P), median of repeats, "
            "synchronized, periodic symmetrization off; bytes = 2 × the stored P (one read and "
            "one write of the lower tiles per update, rank-1 and rank-k alike); 'full path' = "
            "the full-storage update of earlier versions timed in the same run "
            "(3·itemsize·Σn² bytes); bound = tensor copy bandwidth measured in the same "
            "run (read + write counted"
            + ("; device-to-device copy" if where == "cuda" else "")
            + "):"
            if rank_k
            else "Kalman update (rank-1), median of repeats; bytes = 2 × the stored P (one "
            "read + one write of the lower tiles); bound = tensor copy bandwidth measured in "
            "the same run:",
            "",
        ]
        head = (
            "| model | block size | blocks | P GiB | ms/update | GB moved | achieved GB/s | "
            "bound GB/s | achieved/bound |"
        )
        sep = "|---|---|---|---|---|---|---|---|---|"
        if extra:
            head += " P dtype |"
            sep += "---|"
        kernel_col = any("kernel" in m for m in micro)
        if kernel_col:
            head += " kernel |"
            sep += "---|"
        full_col = any("full_ms_per_update" in m for m in micro)
        if full_col:
            head += " tile | full path ms/update | full path achieved/bound | speed-up |"
            sep += "---|---|---|---|"
        if rank_k:
            head += (
                f" rank-{k} ms/update | rank-{k} ms/measurement | rank-{k} achieved GB/s | "
                f"rank-{k} achieved/bound | rank-{k} speed-up per measurement |"
            )
            sep += "---|---|---|---|---|"
        if gpu:
            head += " peak GPU MiB |"
            sep += "---|"
        lines += [head, sep]
        for m in micro:
            ms = m["ms_per_update"]
            line = (
                f"| {m['model']} | {m['block_size']} | {m['n_blocks']} | {m['p_gib']:.3f} "
                f"| {_ms(ms)} | {m['gb_moved']:.2f} | {m['achieved_gbs']:.1f} "
                f"| {m['bound_gbs']:.1f} | {m['achieved_over_bound']:.2f} |"
            )
            if extra:
                line += f" {m.get('p_dtype', '')} |"
            if kernel_col:
                line += f" {m.get('kernel', '')} |"
            if full_col:
                if "full_ms_per_update" in m:
                    line += (
                        f" {m.get('tile', '')} | {_ms(m['full_ms_per_update'])} "
                        f"| {m['full_achieved_over_bound']:.2f} | {m['speedup_vs_full']:.2f} |"
                    )
                else:
                    line += f" {m.get('tile', '')} | | | |"
            if rank_k:
                if "rankk_ms_per_update" in m:
                    line += (
                        f" {_ms(m['rankk_ms_per_update'])} "
                        f"| {_ms(m['rankk_ms_per_measurement'])} "
                        f"| {m['rankk_achieved_gbs']:.1f} | {m['rankk_achieved_over_bound']:.2f} "
                        f"| {m['rankk_speedup_per_measurement']:.2f} |"
                    )
                else:
                    line += " | | | | |"
            if gpu:
                line += f" {_fmt(m.get('peak_gpu_mib'), '.0f')} |"
            lines.append(line)
    if trained:
        lines += ["", f"Learning curves: `{Path(str(base) + '-curves.png').name}`."]
    lines.append("")
    md = Path(f"{base}.md")
    md.write_text("\n".join(lines))
    return md


def _plot(runs: list[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(r.dataset for r in runs))
    if not datasets:
        return
    fig, axes = plt.subplots(len(datasets), 4, figsize=(16, 3.2 * len(datasets)), squeeze=False)
    for row, ds in enumerate(datasets):
        for r in (r for r in runs if r.dataset == ds and r.epochs):
            style = {"rlekf": "-", "rlekf_fused": "-."}.get(r.optim, "--")
            label = r.optim if r.seed == min(x.seed for x in runs) else None
            for col, (x, y, xl, yl) in enumerate(
                [
                    (r.epochs, r.force_rmse, "epoch", "val force RMSE (eV/Å)"),
                    (r.train_s, r.force_rmse, "training time (s)", "val force RMSE (eV/Å)"),
                    (r.epochs, r.energy_rmse, "epoch", "val energy RMSE (eV/atom)"),
                    (r.train_s, r.energy_rmse, "training time (s)", "val energy RMSE (eV/atom)"),
                ]
            ):
                ax = axes[row, col]
                color = {"rlekf": "C0", "rlekf_fused": "C1", "adam": "C2"}.get(r.optim)
                ax.plot(x, y, style, marker="o", ms=3, label=label, color=color)
                ax.set_xlabel(xl)
                ax.set_ylabel(yl)
                ax.set_yscale("log")
                ax.set_title(ds)
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


#: epochs of Adam's calibration run (the first is left out of the rate: warm-up)
ADAM_CALIBRATION_EPOCHS = 5

#: per budget clock, the fraction of the budget Adam's planned schedule may fill
#: (:func:`adam_epochs_for_budget`'s ``safety``): training time varies only with the
#: epochs' own speed; the wall-clock also with validation and checkpoint writes
ADAM_PLAN_SAFETY = {"train": 0.95, "wall": 0.9}


def calibrate_adam(
    dataset: str,
    overrides: list[str],
    budget_s: int,
    out: Path,
    epochs: int = ADAM_CALIBRATION_EPOCHS,
    data: str | None = None,
    clock: str = "train",
) -> tuple[int | None, float | None, RunResult]:
    """Short Adam run (``epochs`` epochs) to time an epoch; returns (max_epochs, s/epoch, run).

    The epoch is timed on the budget's ``clock`` (training time or wall-clock) and the
    schedule fills :data:`ADAM_PLAN_SAFETY` of the budget on that clock.
    ``(None, None, run)`` when the run logged fewer than two epochs (then keep the preset).
    """
    safety = ADAM_PLAN_SAFETY[check_clock(clock)]
    run = run_training(
        dataset, "adam", with_max_epochs(overrides, epochs), budget_s, out, data=data, clock=clock
    )
    try:
        n, s_per_epoch = adam_epochs_for_budget(run.clock_s(clock), budget_s, safety=safety)
    except ValueError:
        return None, None, run
    return n, s_per_epoch, run


def device_overrides(device: torch.device, extra: list[str]) -> list[str]:
    """``trainer=gpu`` / ``trainer=cpu`` for the training runs, unless ``extra`` picks one."""
    if any(o.lstrip("+~").startswith("trainer=") for o in extra):
        return []
    return ["trainer=gpu" if device.type == "cuda" else "trainer=cpu"]


def main(argv: list[str] | None = None) -> int:
    """Command line; returns the exit status. ``--profile`` hands over to
    :func:`rlekf.profile.main` (its own options: ``rlekf-bench --profile --help``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--profile" in argv:
        from rlekf.profile import main as profile_main

        return profile_main([a for a in argv if a != "--profile"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--budget", type=int, default=None, help="seconds of training per run")
    parser.add_argument("--datasets", nargs="*", default=None, help="subset of the preset's")
    parser.add_argument("--optims", nargs="*", default=None, choices=OPTIMS, help="subset")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: tmp)")
    parser.add_argument("--no-train", action="store_true", help="microbenchmark only")
    parser.add_argument("--no-micro", action="store_true", help="training comparison only")
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for all runs")
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help="one run per optimizer and seed (model init, split and sampling); rows give the "
        "mean ± std over seeds and the ratio of the means (default: 0 1 2)",
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="microbenchmark device and trainer=cpu/gpu for training (auto: cuda if available)",
    )
    parser.add_argument(
        "--adam-epochs",
        type=parse_adam_epochs,
        default=None,
        help="Adam's max_epochs (its lr schedule length): 'auto' (default: time a 5-epoch "
        "calibration run and fit the schedule into the budget; the report gives the plan's "
        "error), 'preset' (the preset's epochs, tuned on a 2-core CPU), or N",
    )
    parser.add_argument(
        "--clock",
        choices=BUDGET_CLOCKS,
        default="train",
        help="what --budget is on: 'train' (default: seconds of training, validation and "
        "checkpoint writes outside, so every optimizer trains equally long; Adam's "
        "calibration times training epochs) or 'wall' (Lightning max_time, as before "
        "2026-12-06)",
    )
    parser.add_argument(
        "--select",
        choices=SELECTIONS,
        default="force",
        help="what picks each run's best checkpoint file: 'force' (default: validation force "
        "RMSE) or 'score' (energy RMSE / energy target + force RMSE / force target, the "
        "preset's targets as scales); the tables do not depend on it, the checkpoints "
        "evaluated afterwards (e.g. on a test split) do",
    )
    parser.add_argument("--tag", default=None, help="report file tag (default: host name)")
    parser.add_argument(
        "--name", default=None, help="last part of the file names (default: preset, or micro)"
    )
    parser.add_argument("--rank-k", type=int, default=5, help="k of the fused microbenchmark")
    parser.add_argument("--micro-repeats", type=int, default=None, help="timed updates per row")
    parser.add_argument(
        "--micro-blocks", type=int, nargs="*", default=None, help="block sizes (preset's)"
    )
    parser.add_argument(
        "--micro-models",
        nargs="*",
        default=["Cu", "H2O"],
        choices=sorted(MICRO_MODELS),
        help="microbenchmark models (H2O-deepmd: DeePMD-kit's default-size water model)",
    )
    parser.add_argument(
        "--micro-dtypes", nargs="*", default=["float64", "float32"], help="P dtypes"
    )
    parser.add_argument(
        "--micro-tiles", type=int, nargs="*", default=None, help="tile edges (default: 256)"
    )
    parser.add_argument(
        "--micro-kernels",
        nargs="*",
        default=["fused", "torch"],
        choices=["auto", "fused", "torch"],
        help="RLEKF sweep kernels, one row each (default: fused and torch)",
    )
    parser.add_argument(
        "--no-full-path",
        action="store_true",
        help="do not time the full-storage path beside (it needs sum n^2 elements of memory)",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    budget = args.budget or preset["budget_s"]
    device = resolve_device(args.device)
    adam_mode = args.adam_epochs or "auto"
    work = args.work or Path(tempfile.mkdtemp(prefix="rlekf-bench-"))
    runs: list[RunResult] = []
    notes: list[str] = []
    if not args.no_train:
        # refused before any run: --select score on a data set without targets
        select_over = {
            ds: selection_overrides(args.select, over.get("targets"), ds)
            for ds, over in preset["datasets"].items()
            if not args.datasets or ds in args.datasets
        }
        dev_over = device_overrides(device, args.extra)
        for ds, over in preset["datasets"].items():
            if args.datasets and ds not in args.datasets:
                continue
            adam_n: int | None = None  # calibrated once per data set
            note = selection_note(args.select, over.get("targets"), ds)
            if note:
                notes.append(note)
            for seed in args.seeds:
                for optim in args.optims or OPTIMS:
                    overrides = [
                        *dev_over,
                        *over.get("all", []),
                        *over.get(optim, []),
                        *select_over[ds],
                        *args.extra,
                    ]
                    if optim == "adam" and adam_mode == "auto" and adam_n is not None:
                        overrides = with_max_epochs(overrides, adam_n)
                    elif optim == "adam" and adam_mode == "auto":
                        n, spe, cal = calibrate_adam(
                            ds,
                            overrides,
                            budget,
                            work / ds / "adam_calib",
                            data=over["data"],
                            clock=args.clock,
                        )
                        adam_n = n
                        if n is None:
                            notes.append(
                                f"- {ds}: Adam calibration logged {len(cal.epochs)} epoch(s) "
                                f"(rc={cal.returncode}); kept the preset's epochs "
                                f"({max_epochs_of(overrides)})."
                            )
                        else:
                            overrides = with_max_epochs(overrides, n)
                            cal_first = cal.clock_s(args.clock)[0]
                            notes.append(
                                f"- {ds}: Adam max_epochs = {n} (auto: {spe:.2f} s/epoch in a "
                                f"{len(cal.epochs)}-epoch calibration, first epoch excluded "
                                f"({cal_first:.1f} s); preset: "
                                f"{max_epochs_of([*over.get('all', []), *over.get('adam', [])])})."
                            )
                        print(f"[bench] {notes[-1]}", flush=True)
                    elif optim == "adam" and isinstance(adam_mode, int):
                        overrides = with_max_epochs(overrides, adam_mode)
                        if seed == args.seeds[0]:
                            notes.append(f"- {ds}: Adam max_epochs = {adam_mode} (--adam-epochs).")
                    elif optim == "adam" and seed == args.seeds[0]:
                        notes.append(
                            f"- {ds}: Adam max_epochs = {max_epochs_of(overrides)} (preset)."
                        )
                    print(
                        f"[bench] {ds} / {optim}: {budget} s ({args.clock}) {overrides}",
                        flush=True,
                    )
                    run_dir = work / ds / f"seed{seed}" / optim
                    r = run_training(
                        ds,
                        optim,
                        overrides,
                        budget,
                        run_dir,
                        seed=seed,
                        data=over["data"],
                        clock=args.clock,
                    )
                    print(
                        f"[bench]   {len(r.epochs)} epochs, rc={r.returncode}, final force "
                        f"{r.force_rmse[-1] if r.force_rmse else 'n/a'}",
                        flush=True,
                    )
                    if optim == "adam" and r.max_epochs and r.curve:
                        notes.append(adam_plan_note(ds, seed, r, budget, args.clock))
                    runs.append(r)
    micro = (
        []
        if args.no_micro
        else microbench(
            args.micro_blocks or preset["micro_blocks"],
            repeats=args.micro_repeats,
            device=device,
            k=args.rank_k,
            p_dtypes=tuple(args.micro_dtypes),
            models=tuple(args.micro_models),
            tiles=tuple(args.micro_tiles) if args.micro_tiles else (None,),
            full=not args.no_full_path,
            kernels=tuple(args.micro_kernels),
        )
    )
    rows = summarize(runs, {ds: over["targets"] for ds, over in preset["datasets"].items()})
    name = args.name or ("micro" if args.no_train else args.preset)
    md = write_report(
        args.out,
        name,
        budget,
        runs,
        rows,
        micro,
        tag=args.tag,
        device=device,
        notes=notes,
        budget_clock=args.clock,
    )
    print(md.read_text())
    print(f"[bench] wrote {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
