"""Energy (per atom, eV/atom), force (eV/Å) and virial (per atom, eV/atom) errors per stage."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection

from rlekf.data import keys as K

__all__ = [
    "METRIC_NAMES",
    "ForceFieldMetrics",
    "check_monitor",
    "check_score_scales",
    "selection_score",
]

#: every quantity :class:`ForceFieldMetrics` can compute (``virial_rmse`` only when asked)
METRIC_NAMES = (
    "energy_rmse",
    "energy_mae",
    "energy_mean_error",
    "force_rmse",
    "force_mae",
    "virial_rmse",
)


def check_score_scales(scales: Mapping[str, float]) -> dict[str, float]:
    """``scales`` as a plain dict, refused unless it names metrics and positive finite scales.

    ``energy_mean_error`` is signed and cannot enter a score; every other name of
    :data:`METRIC_NAMES` can, with its own unit (eV/atom for energies and virials, eV/Å for
    forces).

    Raises:
        ValueError: not a mapping, empty, an unknown or signed metric, or a scale that is not
            a positive finite number.
    """
    out: dict[str, float] = {}
    allowed = [n for n in METRIC_NAMES if n != "energy_mean_error"]
    if not isinstance(scales, Mapping):
        raise ValueError(
            f"score_scales must map metric names to scales, e.g. {{force_rmse: 0.06}}, got "
            f"{scales!r}"
        )
    if not scales:
        raise ValueError(f"score_scales is empty; give one scale per metric of {allowed}")
    for name, value in dict(scales).items():
        if name not in allowed:
            raise ValueError(f"score_scales: unknown metric {name!r}; choose from {allowed}")
        try:
            v = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"score_scales.{name} must be a number, got {value!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"score_scales.{name} must be positive and finite, got {value!r}")
        out[name] = v
    return out


def check_monitor(monitor: str | None, score_scales: Mapping[str, float] | None) -> None:
    """Refuse a ``{stage}/score`` monitor without ``score_scales`` (nothing would log it).

    Raises:
        ValueError: ``monitor`` ends in ``/score`` and ``score_scales`` is empty or None.
    """
    if monitor and monitor.split("/")[-1] == "score" and not score_scales:
        raise ValueError(
            f"monitor={monitor} needs task.score_scales (e.g. "
            "task.score_scales='{energy_rmse: 2.21e-3, force_rmse: 0.06}'): without scales no "
            "score is logged"
        )


def selection_score(values: Mapping[str, float], scales: Mapping[str, float]) -> float:
    """The selection score ``sum(values[m] / scales[m])`` over the metrics in ``scales``.

    Dimensionless: each error in units of its scale (e.g. ``{"energy_rmse": 2.21e-3,
    "force_rmse": 0.06}``: energy RMSE in units of 2.21 meV/atom plus force RMSE in units of
    0.06 eV/Å), so one number weighs energies and forces; lower is better. ``nan`` when a metric
    of ``scales`` is missing from ``values`` (e.g. no forces were evaluated).
    """
    total = 0.0
    for name, scale in scales.items():
        if name not in values:
            return math.nan
        total += float(values[name]) / float(scale)
    return total


class ForceFieldMetrics(nn.Module):
    """torchmetrics for one stage: ``energy_rmse``, ``energy_mae``, ``force_rmse``, ...

    Energy errors are per atom (E_pred − E_label)/n in eV/atom; force errors are over all
    Cartesian components in eV/Å; virial errors per atom in eV/atom (only when requested).
    ``energy_mean_error`` is the signed mean of the per-atom energy errors over the frames
    (eV/atom): the constant offset part of ``energy_rmse`` (its spread about the mean is
    ``sqrt(energy_rmse² − energy_mean_error²)``).
    """

    def __init__(self, virial: bool = False) -> None:
        super().__init__()
        metrics = {
            "energy_rmse": MeanSquaredError(squared=False),
            "energy_mae": MeanAbsoluteError(),
            "energy_mean_error": MeanMetric(nan_strategy="disable"),
            "force_rmse": MeanSquaredError(squared=False),
            "force_mae": MeanAbsoluteError(),
        }
        if virial:
            metrics["virial_rmse"] = MeanSquaredError(squared=False)
        self.metrics = MetricCollection(metrics)
        self.metrics.set_dtype(torch.float64)
        self.virial = virial

    def update(self, preds: Mapping[str, Tensor], batch: Mapping[str, Tensor]) -> None:
        n = batch[K.N_ATOMS].to(torch.float64)
        e_p = preds[K.ENERGY].to(torch.float64) / n
        e_l = batch[K.ENERGY].to(torch.float64) / n
        m = self.metrics
        m["energy_rmse"].update(e_p, e_l)
        m["energy_mae"].update(e_p, e_l)
        m["energy_mean_error"].update(e_p - e_l)
        if K.FORCES in preds:
            f_p = preds[K.FORCES].to(torch.float64).reshape(-1)
            f_l = batch[K.FORCES].to(torch.float64).reshape(-1)
            m["force_rmse"].update(f_p, f_l)
            m["force_mae"].update(f_p, f_l)
        if self.virial and K.VIRIAL in preds:
            has = batch[K.HAS_VIRIAL]
            if bool(has.any()):
                v_p = (preds[K.VIRIAL].to(torch.float64) / n[:, None, None])[has]
                v_l = (batch[K.VIRIAL].to(torch.float64) / n[:, None, None])[has]
                m["virial_rmse"].update(v_p.reshape(-1), v_l.reshape(-1))

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for name, metric in self.metrics.items():
            if metric.update_called:
                out[name] = metric.compute()
        return out

    def reset(self) -> None:
        self.metrics.reset()
