"""Write the format-1 export fixture (run once, with rlekf at commit 22ff6c0).

Files: ``water_v1.ckpt`` (weights + model_config, as rlekf-train stores them), ``water_v1.pt``
(the TorchScript file written by that version's ``rlekf-export``) and ``water_v1_ref.npz``
(energy eV, forces eV/Å, virial eV and atom energies of ``water_like_frame(0)`` from that
version's eager model). ``tests/unit/test_export_compat.py`` checks the current code against them.

    .venv/bin/python -m tests.data.legacy.make_export_v1
"""

from pathlib import Path

import numpy as np
import torch

from rlekf.data import keys as K
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.export import export_model
from rlekf.models import DeepPotential
from tests.helpers.frames import water_like_frame

HERE = Path(__file__).parent
CONFIG = {"sel": [80, 40], "embedding": [4, 8], "fitting": [8, 8], "axis_neuron": 2}


def main() -> None:
    model = DeepPotential(["H", "O"], seed=3, **CONFIG)
    g = torch.Generator().manual_seed(0)
    model.set_statistics(
        {
            "env_avg": torch.rand(2, 4, generator=g, dtype=torch.float64) * 0.1,
            "env_std": 1 + torch.rand(2, 4, generator=g, dtype=torch.float64),
            "energy_bias": [-13.6, -2041.3],
        }
    )
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": dict(model.config)}, HERE / "water_v1.ckpt")
    export_model(HERE / "water_v1.ckpt", HERE / "water_v1.pt")
    item = frame_to_item(water_like_frame(0), ["H", "O"], model.rcut, CONFIG["sel"])
    out = model(collate_atoms([item]), forces=True, virial=True)
    np.savez(
        HERE / "water_v1_ref.npz",
        energy=out[K.ENERGY].detach().numpy(),
        forces=out[K.FORCES].detach().numpy(),
        virial=out[K.VIRIAL].detach().numpy(),
        atom_energy=out["atom_energy"].detach().numpy(),
    )


if __name__ == "__main__":
    main()
