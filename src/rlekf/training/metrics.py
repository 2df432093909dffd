"""Energy (per atom, eV/atom), force (eV/Å) and virial (per atom, eV/atom) errors per stage."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanMetric, MeanSquaredError, MetricCollection

from rlekf.data import keys as K

__all__ = ["ForceFieldMetrics"]


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
