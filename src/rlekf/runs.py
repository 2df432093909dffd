"""Reading training runs and the time-to-accuracy accounting shared by ``rlekf-bench`` and
``rlekf-report``.

A run's curve is its validation points, read from the Lightning ``CSVLogger`` file
(``<run>/csv/metrics.csv``) with the clocks that :class:`~rlekf.training.callbacks.EpochSummary`
logs beside them. The accounting:

* **time** is training time only (``time/train_s``: validation and checkpoint writes outside
  the clock); runs logged before that column existed fall back to the wall-clock
  ``time/elapsed_s`` (:attr:`ValPoint.clock` says which);
* **epochs** are training epochs done, fractional when the budget cut the last one
  (``time/epochs``; else ``epoch + 1``); seconds per epoch come from whole epochs only;
* **targets** are ``factor`` × the best validation RMSE of a set of runs;
* a validation of the model before training (step 0, :func:`initial_point`) takes part in
  neither: it is the reference of the dead time (:func:`dead_time`) only;
* a run reaches a target at the first point from which its RMSE **stays** ≤ the target to the
  end of the run (primary), or at its **first crossing** (secondary);
* an optimizer pair's ratio (Adam / Kalman) is exact when both reach the target, a lower bound
  ``>=`` when only the Kalman run does (Adam's whole run in the numerator) and an upper bound
  ``<=`` when only Adam does (the Kalman run's whole length in the denominator); over seeds it
  is the ratio of the means, with a spread from the seeds' standard deviations.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CRITERIA",
    "Ratio",
    "ValPoint",
    "best",
    "dead_time",
    "first_crossing",
    "initial_point",
    "format_mean_std",
    "mean_std",
    "ratio_of_means",
    "reach",
    "read_metrics_csv",
    "s_per_epoch",
    "stays_below",
    "trained",
]

VAL_E = "val/energy_rmse"
VAL_F = "val/force_rmse"
TIME = "time/elapsed_s"
TRAIN_TIME = "time/train_s"
EPOCHS = "time/epochs"
OPT_STEPS = "time/optimizer_steps"
CRITERIA = ("stay", "first")


@dataclass(frozen=True)
class ValPoint:
    """One validation of a run.

    Attributes:
        epoch: Lightning's 0-based epoch index of the row.
        step: global step.
        time_s: wall-clock seconds since the start of fit (``time/elapsed_s``), everything
            included.
        energy_rmse: validation energy RMSE (eV/atom).
        force_rmse: validation force RMSE (eV/Å).
        train_s: training seconds since the start of fit (``time/train_s``); NaN if not logged.
        epochs_done: training epochs done, fractional (``time/epochs``); NaN if not logged.
        optimizer_steps: optimizer steps done (``time/optimizer_steps``, Lightning's
            ``global_step``: Kalman updates in paper mode); NaN if not logged.
    """

    epoch: int
    step: int
    time_s: float
    energy_rmse: float
    force_rmse: float
    train_s: float = math.nan
    epochs_done: float = math.nan
    optimizer_steps: float = math.nan

    @property
    def epochs(self) -> float:
        """Training epochs done at this point (``epoch + 1`` for older logs)."""
        return self.epochs_done if math.isfinite(self.epochs_done) else float(self.epoch + 1)

    @property
    def train_time(self) -> float:
        """Training seconds (the wall-clock ``time_s`` for logs without ``time/train_s``)."""
        return self.train_s if math.isfinite(self.train_s) else self.time_s

    @property
    def clock(self) -> str:
        """``"train"`` (training time only) or ``"wall"`` (older logs)."""
        return "train" if math.isfinite(self.train_s) else "wall"


def _num(text: str | None) -> float | None:
    if text is None or text == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _opt(x: float | None) -> float:
    return math.nan if x is None else x


def read_metrics_csv(path: str | Path) -> tuple[list[ValPoint], dict[str, float]]:
    """Read a Lightning ``CSVLogger`` file into validation points and test metrics.

    A validation point is every row with ``val/force_rmse``; a clock missing from that row is
    taken from the last row of the same epoch that has it (NaN if none).

    Args:
        path: ``<run>/csv/metrics.csv``.

    Returns:
        ``(curve, test)``: validation points in order, and the last value of each ``test/*``.

    Raises:
        ValueError: a validation row with a non-numeric ``val/force_rmse`` (file and line named).
    """
    path = Path(path)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    by_epoch: dict[str, dict[int, float]] = {TIME: {}, TRAIN_TIME: {}, EPOCHS: {}, OPT_STEPS: {}}
    for row in rows:
        ep = _num(row.get("epoch"))
        for key, table in by_epoch.items():
            t = _num(row.get(key))
            if t is not None and ep is not None:
                table[int(ep)] = t
    curve: list[ValPoint] = []
    test: dict[str, float] = {}
    for line, row in enumerate(rows, start=2):
        epoch = int(_num(row.get("epoch")) or 0)
        text = row.get(VAL_F)
        force = _num(text)
        if text not in (None, "") and force is None:
            raise ValueError(f"{path}:{line}: {VAL_F} is not a number: {text!r}")
        if force is not None:

            def clock(key: str, epoch: int = epoch, row: dict = row) -> float:
                t = _num(row.get(key))
                return t if t is not None else by_epoch[key].get(epoch, math.nan)

            curve.append(
                ValPoint(
                    epoch=epoch,
                    step=int(_num(row.get("step")) or 0),
                    time_s=clock(TIME),
                    energy_rmse=_opt(_num(row.get(VAL_E))),
                    force_rmse=force,
                    train_s=clock(TRAIN_TIME),
                    epochs_done=clock(EPOCHS),
                    optimizer_steps=clock(OPT_STEPS),
                )
            )
        for key, value in row.items():
            if key and key.startswith("test/") and _num(value) is not None:
                test[key] = float(value)
    return curve, test


# ----------------------------------------------------------------------------- criteria
def _value(point: ValPoint, quantity: str) -> float:
    return getattr(point, f"{quantity}_rmse")


def first_crossing(curve: Sequence[ValPoint], quantity: str, target: float) -> ValPoint | None:
    """The first point whose ``quantity`` (``"force"``/``"energy"``) RMSE is ≤ ``target``."""
    for point in curve:
        if _value(point, quantity) <= target:
            return point
    return None


def stays_below(curve: Sequence[ValPoint], quantity: str, target: float) -> ValPoint | None:
    """The first point from which the RMSE stays ≤ ``target`` to the end of the run (a NaN
    breaks it); None when the last point is above the target."""
    hit = None
    for point in curve:
        if _value(point, quantity) <= target:
            hit = hit or point
        else:
            hit = None
    return hit


def reach(
    curve: Sequence[ValPoint], quantity: str, target: float, criterion: str = "stay"
) -> ValPoint | None:
    """:func:`stays_below` (``"stay"``) or :func:`first_crossing` (``"first"``)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if math.isnan(target):
        return None
    rule = stays_below if criterion == "stay" else first_crossing
    return rule(trained(curve), quantity, target)


def initial_point(curve: Sequence[ValPoint]) -> ValPoint | None:
    """The validation before training (step 0, no training epoch done), logged by
    ``EpochSummary(initial_point=True)``; None when the run has none."""
    if curve and curve[0].step == 0 and curve[0].epochs == 0.0:
        return curve[0]
    return None


def trained(curve: Sequence[ValPoint]) -> Sequence[ValPoint]:
    """The curve without its step-0 point (:func:`initial_point`): what targets, bests and
    "reached" are read from (an untrained model does not reach a target)."""
    return curve[1:] if initial_point(curve) is not None else curve


def dead_time(
    curve: Sequence[ValPoint],
    quantity: str = "force",
    fraction: float = 0.5,
    criterion: str = "stay",
) -> ValPoint | None:
    """The first validation from which the RMSE stays ≤ ``fraction`` × its value before
    training (``criterion="first"``: first crossing): "updates until the force RMSE halves".

    Read ``.epochs`` (training epochs done) and ``.optimizer_steps`` of the result.

    Args:
        curve: validation points whose first is the step-0 point (:func:`initial_point`).
        quantity: ``"force"`` or ``"energy"``.
        fraction: in (0, 1).

    Returns:
        The point, or None when the RMSE never got (or did not stay) there.

    Raises:
        ValueError: the curve has no step-0 point, or ``fraction`` is outside (0, 1).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction}")
    start = initial_point(curve)
    if start is None:
        raise ValueError(
            "the run has no validation at step 0: train with "
            "callbacks.epoch_summary.initial_point=true trainer.num_sanity_val_steps=-1"
        )
    return reach(curve, quantity, fraction * _value(start, quantity), criterion)


def best(curves: Iterable[Sequence[ValPoint]], quantity: str) -> float:
    """The lowest ``quantity`` RMSE over all trained points of all curves (step-0 points left
    out; NaN when there is none)."""
    vals = [_value(p, quantity) for c in curves for p in trained(c)]
    vals = [v for v in vals if not math.isnan(v)]
    return min(vals) if vals else math.nan


def s_per_epoch(curve: Sequence[ValPoint]) -> float:
    """Training seconds per epoch over the whole epochs of a run: the training time at the last
    point that ends a whole epoch, divided by its epochs (a truncated last epoch is left out).
    NaN when no whole epoch ended."""
    whole = [p for p in curve if p.epochs >= 1 and abs(p.epochs - round(p.epochs)) < 1e-6]
    if not whole:
        return math.nan
    p = whole[-1]
    return p.train_time / round(p.epochs)


# ----------------------------------------------------------------------------- seeds, ratios
def mean_std(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, sample standard deviation (NaN for one value) and count of the non-NaN values."""
    vals = [float(v) for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan, 0
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return statistics.fmean(vals), std, len(vals)


def format_mean_std(mean: float, std: float, n: int | None = None, of: int | None = None) -> str:
    """``"0.1234 ± 0.0056"`` (4 significant digits, std 2), ``"–"`` when NaN, ``" (2/3)"``
    appended when only ``n`` of ``of`` runs have a value."""
    if math.isnan(mean):
        text = "–"
    elif math.isnan(std):
        text = f"{mean:.4g}"
    else:
        text = f"{mean:.4g} ± {std:.2g}"
    if n is not None and of is not None and n < of:
        text += f" ({n}/{of})"
    return text


@dataclass(frozen=True)
class Ratio:
    """Adam / Kalman ratio of the means over seeds, possibly a bound.

    Attributes:
        value: the ratio (NaN when undetermined).
        spread: its spread, ``value·sqrt((s_A/m_A)² + (s_K/m_K)²)`` from the seeds' sample
            standard deviations (NaN with one seed or for a bound).
        bound: ``"="`` (both reached in every seed), ``">="`` (Kalman reached in every seed,
            Adam not in all: its run lengths stand in), ``"<="`` (Adam reached in every seed,
            Kalman not in all) or ``None`` (neither reached in every seed).
        n_adam / n_kalman: seeds in which each reached the target.
        n: seeds.
    """

    value: float
    spread: float
    bound: str | None
    n_adam: int
    n_kalman: int
    n: int

    def __str__(self) -> str:
        if self.bound is None or math.isnan(self.value):
            return "–"
        if self.bound == "=":
            if math.isnan(self.spread):
                return f"{self.value:.3g}×"
            return f"{self.value:.3g} ± {self.spread:.2g}×"
        return f"{'≥' if self.bound == '>=' else '≤'} {self.value:.3g}×"


def ratio_of_means(
    adam: Sequence[float | None],
    adam_run: Sequence[float],
    kalman: Sequence[float | None],
    kalman_run: Sequence[float],
) -> Ratio:
    """Adam / Kalman ratio of mean epochs (or seconds) to a target over seeds, with bounds.

    Args:
        adam: per seed, Adam's epochs (or seconds) to the target, None where it missed.
        adam_run: per seed, the epochs (seconds) Adam ran.
        kalman / kalman_run: the same for the Kalman run.

    Returns:
        The :class:`Ratio`. Where one optimizer missed the target in some seed, its whole run
        stands in for that seed: a lower bound of its epochs to the target, so the ratio is a
        bound (``>=`` when Adam missed, ``<=`` when the Kalman run missed); undetermined when
        both missed in some seeds.
    """
    n = len(adam)
    if not (len(adam_run) == len(kalman) == len(kalman_run) == n) or n == 0:
        raise ValueError("need one value per seed for both optimizers")
    n_a = sum(v is not None for v in adam)
    n_k = sum(v is not None for v in kalman)
    a = [v if v is not None else r for v, r in zip(adam, adam_run, strict=True)]
    k = [v if v is not None else r for v, r in zip(kalman, kalman_run, strict=True)]
    (m_a, s_a, _), (m_k, s_k, _) = mean_std(a), mean_std(k)
    if (n_k < n and n_a < n) or not m_k > 0:
        return Ratio(math.nan, math.nan, None, n_a, n_k, n)
    value = m_a / m_k
    if n_a == n_k == n:
        spread = value * math.sqrt((s_a / m_a) ** 2 + (s_k / m_k) ** 2) if n > 1 else math.nan
        return Ratio(value, spread, "=", n_a, n_k, n)
    return Ratio(value, math.nan, ">=" if n_a < n else "<=", n_a, n_k, n)
