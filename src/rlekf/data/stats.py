"""Training-set statistics: per-element energy bias and descriptor normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rlekf import keys as K
from rlekf.models.env import environment_matrix, pair_vectors

__all__ = ["energy_bias", "env_statistics"]

_MIN_STD = 1.0e-2  # as DeePMD-kit's protection against a vanishing spread


def energy_bias(energies: np.ndarray, type_counts: np.ndarray) -> np.ndarray:
    """Per-element energies e_t (eV) minimising Σ_f (E_f − Σ_t c_ft e_t)² (least squares).

    Args:
        energies: (F,) eV.
        type_counts: (F, ntypes) atoms of each type per frame.

    Returns:
        (ntypes,) eV. With a rank-deficient composition (e.g. every water frame is H128O64)
        this is the minimum-norm solution, as in DeePMD-kit's ``bias_atom_e``.
    """
    a = np.asarray(type_counts, dtype=np.float64)
    e = np.asarray(energies, dtype=np.float64)
    sol, *_ = np.linalg.lstsq(a, e, rcond=None)
    return sol


def env_statistics(
    items: Sequence[dict[str, torch.Tensor]], ntypes: int, rcut_smth: float, rcut: float
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and spread of the environment matrix per centre type over occupied slots.

    Column 0 (s) gets its own mean and standard deviation; columns 1–3 get mean 0 and one
    common root-mean-square. Returns ``env_avg`` and ``env_std``, each (ntypes, 4).
    """
    s_sum = np.zeros(ntypes)
    s2_sum = np.zeros(ntypes)
    xyz2_sum = np.zeros(ntypes)
    count = np.zeros(ntypes)
    with torch.no_grad():
        for item in items:
            pos = item[K.POSITIONS].to(torch.float64)
            cell = item[K.CELL].to(torch.float64)
            batch = torch.zeros(pos.shape[0], dtype=torch.int64)
            nbr = item[K.NEIGHBORS].to(torch.int64)
            rij, mask = pair_vectors(pos, cell, batch, nbr, item[K.SHIFTS])
            env = environment_matrix(rij, mask, rcut_smth, rcut)
            types = item[K.TYPES]
            for t in range(ntypes):
                sel = (types == t).unsqueeze(1) & mask
                if not bool(sel.any()):
                    continue
                e = env[sel]  # (k, 4)
                s_sum[t] += float(e[:, 0].sum())
                s2_sum[t] += float((e[:, 0] ** 2).sum())
                xyz2_sum[t] += float((e[:, 1:] ** 2).sum()) / 3.0
                count[t] += e.shape[0]
    avg = np.zeros((ntypes, 4))
    std = np.ones((ntypes, 4))
    ok = count > 0
    avg[ok, 0] = s_sum[ok] / count[ok]
    var0 = np.where(ok, s2_sum / np.maximum(count, 1) - avg[:, 0] ** 2, 1.0)
    std[:, 0] = np.sqrt(np.maximum(var0, 0.0))
    std[:, 1:] = np.sqrt(np.where(ok, xyz2_sum / np.maximum(count, 1), 1.0))[:, None]
    std = np.where(std < _MIN_STD, _MIN_STD, std)
    return avg, std
