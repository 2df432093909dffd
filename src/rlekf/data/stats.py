"""Training-set statistics: per-element energy bias and descriptor normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rlekf import keys as K
from rlekf.models.env import environment_matrix, pair_vectors

__all__ = ["energy_bias", "env_statistics"]

_MIN_STD = 1.0e-2  # DeePMD-kit's "protection" against a vanishing spread (1/Å)
_DEFAULT_STD = 1.0e-1  # DeePMD-kit's standard deviation of a type without data (1/Å)


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
    """Descriptor statistics per centre type, as DeePMD-kit's se_e2_a computes them.

    For every atom of centre type t, all ``sum(sel)`` neighbour slots count, the empty ones as
    zero rows (DeePMD-kit's ``EnvMatStatSe``: padding included). Column 0 (s, 1/Å) gets its
    mean and standard deviation; columns 1–3 (s·x/r, s·y/r, s·z/r) are pooled into one
    population whose standard deviation (about its own mean) is shared by the three, and
    their mean is stored as 0. A standard deviation below 1e-2 is raised to 1e-2
    (DeePMD-kit's ``protection``); a type with no atoms in ``items`` gets mean 0 and standard
    deviation 0.1 (DeePMD-kit's defaults).

    Args:
        items: single-frame items (see :func:`rlekf.data.dataset.frame_to_item`).
        ntypes: number of element types.
        rcut_smth: start of the switching r_s (Å).
        rcut: cutoff r_c (Å).

    Returns:
        ``env_avg`` and ``env_std``, each (ntypes, 4), in 1/Å.
    """
    n_rows = np.zeros(ntypes)  # slots (rows) per type
    r_sum, r_sq = np.zeros(ntypes), np.zeros(ntypes)
    a_sum, a_sq = np.zeros(ntypes), np.zeros(ntypes)
    with torch.no_grad():
        for item in items:
            pos = item[K.POSITIONS].to(torch.float64)
            cell = item[K.CELL].to(torch.float64)
            batch = torch.zeros(pos.shape[0], dtype=torch.int64)
            nbr = item[K.NEIGHBORS].to(torch.int64)
            rij, mask = pair_vectors(pos, cell, batch, nbr, item[K.SHIFTS])
            env = environment_matrix(rij, mask, rcut_smth, rcut)  # empty slots: zero rows
            types = item[K.TYPES]
            for t in range(ntypes):
                rows = env[types == t].reshape(-1, 4)
                n_rows[t] += rows.shape[0]
                r_sum[t] += float(rows[:, 0].sum())
                r_sq[t] += float((rows[:, 0] ** 2).sum())
                a_sum[t] += float(rows[:, 1:].sum())
                a_sq[t] += float((rows[:, 1:] ** 2).sum())
    avg = np.zeros((ntypes, 4))
    std = np.full((ntypes, 4), _DEFAULT_STD)
    ok = n_rows > 0
    avg[ok, 0] = r_sum[ok] / n_rows[ok]
    std[ok, 0] = _std(r_sq[ok], r_sum[ok], n_rows[ok])
    std[ok, 1:] = _std(a_sq[ok], a_sum[ok], 3.0 * n_rows[ok])[:, None]
    return avg, std


def _std(sq: np.ndarray, total: np.ndarray, n: np.ndarray) -> np.ndarray:
    """sqrt(E[x²] − E[x]²), raised to ``_MIN_STD`` where smaller (round-off below 0 included)."""
    mean = total / n
    return np.maximum(np.sqrt(np.maximum(sq / n - mean * mean, 0.0)), _MIN_STD)
