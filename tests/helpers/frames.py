"""Small synthetic frames for tests (no files needed)."""

from __future__ import annotations

import numpy as np
import torch

from rlekf.data import keys as K
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.data.readers import Frame
from rlekf.data.stats import env_statistics
from rlekf.models import DeepPotential


def cu_frame(size: int = 2, rattle: float = 0.1, seed: int = 0, a: float = 3.61) -> Frame:
    """A rattled periodic fcc Cu cell labelled with EMT."""
    from ase.build import bulk
    from ase.calculators.emt import EMT

    atoms = bulk("Cu", "fcc", a=a, cubic=True).repeat(size)
    rng = np.random.default_rng(seed)
    atoms.positions += rng.normal(0.0, rattle, atoms.positions.shape)
    atoms.calc = EMT()
    return Frame.from_atoms(atoms, source="<emt>", index=seed)


def water_like_frame(seed: int = 0, n_mol: int = 8, box: float = 6.5) -> Frame:
    """A periodic box of randomly placed and oriented H2O molecules with fake labels."""
    rng = np.random.default_rng(seed)
    pos, numbers = [], []
    grid = np.stack(np.meshgrid(*[np.arange(2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for k in range(n_mol):
        o = (grid[k] + 0.5 + rng.uniform(-0.1, 0.1, 3)) * box / 2
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        h1 = o + q @ np.array([0.96, 0.0, 0.0])
        h2 = o + q @ np.array([0.96 * np.cos(1.82), 0.96 * np.sin(1.82), 0.0])
        pos += [o, h1, h2]
        numbers += [8, 1, 1]
    n = len(numbers)
    return Frame(
        positions=np.array(pos),
        cell=np.eye(3) * box,
        pbc=np.array([True] * 3),
        numbers=np.array(numbers),
        energy=-100.0,
        forces=np.zeros((n, 3)),
        virial=None,
        source="<water-like>",
        index=seed,
    )


def model_and_batch(frames, type_map, sel, rcut=6.0, rcut_smth=0.5, seed=0, **kw):
    """A DeepPotential with statistics fitted on ``frames`` and the collated batch."""
    items = [frame_to_item(f, type_map, rcut, sel, i) for i, f in enumerate(frames)]
    model = DeepPotential(type_map, rcut=rcut, rcut_smth=rcut_smth, sel=sel, seed=seed, **kw)
    avg, std = env_statistics(items, len(type_map), rcut_smth, rcut)
    model.set_statistics({"env_avg": avg, "env_std": std, "energy_bias": np.zeros(len(type_map))})
    return model, collate_atoms(items)


def energy(model, batch, positions=None, cell=None) -> torch.Tensor:
    b = dict(batch)
    if positions is not None:
        b[K.POSITIONS] = positions
    if cell is not None:
        b[K.CELL] = cell
    return model(b, forces=False)[K.ENERGY]
