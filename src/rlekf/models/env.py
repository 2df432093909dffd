"""Pure functions for the smooth environment matrix of se_e2_a (no parameters).

Shapes: ``N`` atoms, ``M`` neighbour slots. Lengths in Å.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["smooth_weight", "pair_vectors", "environment_matrix"]


def smooth_weight(r: Tensor, rcut_smth: float, rcut: float) -> Tensor:
    """s(r) of the Deep Potential (1/Å): 1/r below ``rcut_smth``, C²-smooth to 0 at ``rcut``.

    For r_s ≤ r < r_c: s = (1/r)·[u³(−6u² + 15u − 10) + 1], u = (r − r_s)/(r_c − r_s).
    """
    u = ((r - rcut_smth) / (rcut - rcut_smth)).clamp(0.0, 1.0)
    switch = u**3 * (-6.0 * u**2 + 15.0 * u - 10.0) + 1.0
    return torch.where(r < rcut, switch / r, torch.zeros_like(r))


def pair_vectors(
    positions: Tensor, cell: Tensor, batch: Tensor, neighbors: Tensor, shifts: Tensor
) -> tuple[Tensor, Tensor]:
    """Vectors r_ij = r_j + S·cell − r_i for every neighbour slot.

    Args:
        positions: (N, 3) Å.
        cell: (B, 3, 3) Å, rows are lattice vectors.
        batch: (N,) frame index of each atom.
        neighbors: (N, M) global neighbour index, -1 for empty slots.
        shifts: (N, M, 3) integer cell shifts (any float or int dtype).

    Returns:
        rij: (N, M, 3) Å (empty slots hold a dummy vector beyond any cutoff), mask: (N, M) bool.
    """
    mask = neighbors >= 0
    safe = torch.where(mask, neighbors, torch.zeros_like(neighbors))
    offset = torch.einsum("nmk,nkl->nml", shifts.to(positions.dtype), cell[batch])
    rij = positions[safe] + offset - positions.unsqueeze(1)
    far = torch.zeros_like(rij)
    far[..., 0] = 1.0e3
    rij = torch.where(mask.unsqueeze(-1), rij, far)
    return rij, mask


def environment_matrix(rij: Tensor, mask: Tensor, rcut_smth: float, rcut: float) -> Tensor:
    """Rows (s, s·x/r, s·y/r, s·z/r) of R̃ for every slot, zero for empty slots.

    Args:
        rij: (N, M, 3) Å.
        mask: (N, M) bool.

    Returns:
        (N, M, 4), first column in 1/Å, the others in 1/Å as well (s times a unit vector).
    """
    r = torch.linalg.vector_norm(rij, dim=-1)
    s = smooth_weight(r, rcut_smth, rcut)
    s = torch.where(mask, s, torch.zeros_like(s))
    env = torch.cat([s.unsqueeze(-1), (s / r).unsqueeze(-1) * rij], dim=-1)
    return env
