"""Load trained checkpoints and export them as self-contained TorchScript files (``rlekf-export``).

A Lightning checkpoint written by ``rlekf-train`` holds the weights under ``state_dict``
(``model.*``) and the :class:`~rlekf.models.DeepPotential` keyword arguments under
``model_config``; :func:`load_checkpoint` rebuilds the model from those alone, so no Hydra
config is needed.

:func:`export_model` wraps the model in :class:`ExportedDeepPotential`, a TorchScript-friendly
re-statement of the same forward pass (same weights, same operations, so float64 results agree
to round-off), and saves it with :func:`torch.jit.save`. The file loads with plain
``torch.jit.load`` (no rlekf import needed)::

    import json, torch
    extra = {"rlekf.json": ""}
    model = torch.jit.load("model.pt", _extra_files=extra)
    meta = json.loads(extra["rlekf.json"])  # type_map, rcut, rcut_smth, sel, format_version
    out = model(positions, cell, types, batch, neighbors, shifts, True)
    out["energy"], out["forces"], out["virial"], out["atom_energy"]

Inputs follow :mod:`rlekf.data.keys`: positions (N, 3) Å, cell (B, 3, 3) Å, types (N,) int64,
batch (N,) int64, neighbors (N, sum(sel)) int64 (-1 = empty slot, per-type slot layout of
:func:`rlekf.data.neighbors.slot_neighbors`), shifts (N, sum(sel), 3) integer cell shifts.
Outputs: energy (B,) eV, forces (N, 3) eV/Å, virial (B, 3, 3) eV (``-stress·volume``; zeros
unless the last argument is true), atom_energy (N,) eV. Call it with gradients enabled (not
inside ``torch.no_grad()``): forces are autograd derivatives.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlekf.models.deep_potential import DeepPotential
from rlekf.models.env import environment_matrix, pair_vectors

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "ExportedDeepPotential",
    "export_model",
    "load_checkpoint",
    "load_exported",
    "main",
]

#: Version of the exported file layout; bump when inputs, outputs or metadata change.
FORMAT_VERSION: int = 1

#: Name of the JSON metadata stored in the TorchScript archive (``_extra_files``).
META_FILE: str = "rlekf.json"

PathLike = str | os.PathLike


# ------------------------------------------------------------------------------ checkpoints
def load_checkpoint(
    path: PathLike, device: str | torch.device = "cpu"
) -> tuple[DeepPotential, dict[str, Any]]:
    """Rebuild the trained :class:`DeepPotential` of a Lightning checkpoint.

    The model is built from the checkpoint's ``model_config`` (not from any Hydra config), so a
    checkpoint of any size, cutoff or type map loads.

    The file is first read with ``weights_only=True``; a checkpoint that also holds numpy
    state (e.g. RLEKF's) is then read in full, as Lightning does: load only trusted files.

    Args:
        path: ``.ckpt`` file written by ``rlekf-train``.
        device: where to put the model.

    Returns:
        The model in eval mode and the checkpoint's ``model_config``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not an rlekf training checkpoint, or its weights do not fit
            its ``model_config``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; give the path of a .ckpt file")
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            # Lightning checkpoints may hold numpy arrays (optimizer/updater state); like
            # Lightning's own resume, read them in full (only load checkpoints you trust)
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not usable"
        raise ValueError(
            f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: {exc}); give a "
            ".ckpt written by rlekf-train (for an exported model use load_exported / "
            "DPCalculator.from_file)"
        ) from exc
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "state_dict" not in ckpt:
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(
            f"{path} is not an rlekf training checkpoint (no 'model_config'/'state_dict'; "
            f"found {keys}); give a .ckpt written by rlekf-train"
        )
    config = dict(ckpt["model_config"])
    state = {
        k[len("model.") :]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    try:
        model = DeepPotential(**config)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"{path}: model_config {config} does not describe a DeepPotential ({exc}); was it "
            "written by another version of rlekf?"
        ) from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: the weights do not match the model described by its model_config "
            f"{config}; the checkpoint comes from another model or is corrupted ({exc})"
        ) from exc
    if not bool(model.stats_fitted):
        raise ValueError(
            f"{path}: the model has no descriptor statistics / energy bias (stats_fitted is "
            "false): it was saved before training started; use a checkpoint of a trained run"
        )
    model.to(device).eval()
    return model, config


# ------------------------------------------------------------------------------ TorchScript
class ExportedDeepPotential(nn.Module):
    """TorchScript-able forward pass of a trained :class:`DeepPotential` (same weights).

    Attributes (readable from the loaded TorchScript module): ``type_map`` (list of symbols),
    ``rcut``/``rcut_smth`` (Å), ``sel`` (list), ``format_version`` (int), ``dtype_name``.

    Args:
        model: a trained DeepPotential (its sub-modules are shared, not copied).
    """

    def __init__(self, model: DeepPotential) -> None:
        super().__init__()
        self.type_map = list(model.type_map)
        self.rcut = float(model.rcut)
        self.rcut_smth = float(model.rcut_smth)
        self.sel = [int(s) for s in model.sel]
        self.offsets = [int(o) for o in model._offsets]
        self.ntypes = len(self.type_map)
        self.n_slots = int(model.n_slots)
        self.axis_neuron = int(model.axis_neuron)
        self.type_one_side = bool(model.type_one_side)
        self.format_version = FORMAT_VERSION
        self.dtype_name = str(model.dtype).replace("torch.", "")
        self.m1 = int(model.config["embedding"][-1])
        self.embeddings = model.embeddings
        self.fittings = model.fittings
        self.register_buffer("env_avg", model.env_avg.detach().clone())
        self.register_buffer("env_std", model.env_std.detach().clone())
        self.register_buffer("energy_bias", model.energy_bias.detach().clone())

    def atomic_energy(
        self,
        positions: Tensor,
        cell: Tensor,
        types: Tensor,
        batch: Tensor,
        neighbors: Tensor,
        shifts: Tensor,
    ) -> Tensor:
        """Energy of each atom (N,) eV; mirrors :meth:`DeepPotential.atomic_energy`."""
        rij, mask = pair_vectors(positions, cell, batch, neighbors, shifts)
        env = environment_matrix(rij, mask, self.rcut_smth, self.rcut)
        env = (env - self.env_avg[types].unsqueeze(1)) / self.env_std[types].unsqueeze(1)
        nt = self.ntypes
        n = positions.shape[0]
        acc = positions.new_zeros(n, self.m1, 4)
        for k, net in enumerate(self.embeddings):
            # one net per (ti, tj), or per tj shared by every centre type (type_one_side)
            for ti in range(nt):
                tj = k if self.type_one_side else k % nt
                if self.type_one_side or k // nt == ti:
                    idx = torch.nonzero(types == ti).squeeze(1)
                    if idx.numel() > 0:
                        off = self.offsets[tj]
                        sl = env[idx, off : off + self.sel[tj]]
                        g = net(sl[:, :, :1])  # (n_t, sel_j, M1)
                        acc = acc.index_add(0, idx, torch.einsum("nsm,nsk->nmk", g, sl))
        acc = acc / self.n_slots
        desc = acc @ acc[:, : self.axis_neuron].transpose(1, 2)  # (N, M1, M2)
        desc = desc.reshape(n, -1)
        out = positions.new_zeros(n)
        for ti, net in enumerate(self.fittings):
            idx = torch.nonzero(types == ti).squeeze(1)
            if idx.numel() > 0:
                out = out.index_copy(0, idx, net(desc[idx]) + self.energy_bias[ti])
        return out

    def forward(
        self,
        positions: Tensor,
        cell: Tensor,
        types: Tensor,
        batch: Tensor,
        neighbors: Tensor,
        shifts: Tensor,
        virial: bool = False,
    ) -> dict[str, Tensor]:
        """Energies (B,) eV, forces (N, 3) eV/Å, virials (B, 3, 3) eV, atom energies (N,) eV.

        Args:
            positions: (N, 3) Å.
            cell: (B, 3, 3) Å, rows are lattice vectors.
            types: (N,) int64 index into ``type_map``.
            batch: (N,) int64 frame index of each atom.
            neighbors: (N, sum(sel)) int64, -1 for empty slots.
            shifts: (N, sum(sel), 3) integer cell shifts.
            virial: also compute the virial (zeros otherwise).
        """
        pos = positions.to(self.env_avg.dtype).detach().requires_grad_(True)
        cell = cell.to(self.env_avg.dtype)
        n_frames = cell.shape[0]
        strain = torch.zeros(n_frames, 3, 3, dtype=pos.dtype, device=pos.device)
        if virial:
            strain.requires_grad_(True)
        pos_in = pos + torch.einsum("ni,nij->nj", pos, strain[batch])
        cell_in = cell + cell @ strain
        e_atom = self.atomic_energy(pos_in, cell_in, types, batch, neighbors, shifts)
        energy = e_atom.new_zeros(n_frames).index_add(0, batch, e_atom)
        if virial:
            grads = torch.autograd.grad([energy.sum()], [pos, strain])
            g_pos, g_strain = grads[0], grads[1]
            assert g_pos is not None and g_strain is not None
            vir = -g_strain
        else:
            grads = torch.autograd.grad([energy.sum()], [pos])
            g_pos = grads[0]
            assert g_pos is not None
            vir = torch.zeros_like(strain)
        return {
            "energy": energy.detach(),
            "forces": -g_pos,
            "virial": vir,
            "atom_energy": e_atom.detach(),
        }


def _metadata(model: DeepPotential, config: dict[str, Any], source: str) -> dict[str, Any]:
    from rlekf import __version__

    return {
        "format_version": FORMAT_VERSION,
        "type_map": list(model.type_map),
        "rcut": float(model.rcut),
        "rcut_smth": float(model.rcut_smth),
        "sel": [int(s) for s in model.sel],
        "dtype": str(model.dtype).replace("torch.", ""),
        "model_config": config,
        "statistics": {
            "env_avg": model.env_avg.tolist(),
            "env_std": model.env_std.tolist(),
            "energy_bias": model.energy_bias.tolist(),
        },
        "source": source,
        "rlekf_version": __version__,
    }


def export_model(model: DeepPotential | PathLike, out: PathLike) -> Path:
    """Script a trained model and save it as a self-contained TorchScript file.

    Args:
        model: a trained :class:`DeepPotential` or the path of a checkpoint.
        out: output file (conventionally ``.pt``); parent folders are created.

    Returns:
        The path written.
    """
    source = "<memory>"
    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        model, config = load_checkpoint(model)
    else:
        config = dict(model.config)
    model = model.to("cpu").eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(_metadata(model, config, source), indent=1)
    with _quiet_jit():
        scripted = torch.jit.script(ExportedDeepPotential(model))
        torch.jit.save(scripted, str(out), _extra_files={META_FILE: meta})
    return out


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """Silence TorchScript's deprecation notices (torch.export cannot hold autograd forces)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit")
        yield


def load_exported(
    path: PathLike, device: str | torch.device = "cpu"
) -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    """Load a file written by :func:`export_model` and check its format version.

    Args:
        path: the exported ``.pt`` file.
        device: where to put the module.

    Returns:
        The TorchScript module (eval mode) and its metadata (``type_map``, ``rcut``,
        ``rcut_smth``, ``sel``, ``dtype``, ``format_version``, ``model_config``, ...).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an rlekf export, or written in another format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported model {path} not found")
    extra = {META_FILE: ""}
    try:
        with _quiet_jit():
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError/ValueError variants
        raise ValueError(
            f"{path} is not a TorchScript file written by rlekf-export ({type(exc).__name__}); "
            "for a Lightning checkpoint use load_checkpoint / DPCalculator.from_checkpoint"
        ) from exc
    if not extra[META_FILE]:
        raise ValueError(
            f"{path} is a TorchScript file without rlekf metadata ({META_FILE}); export the "
            "checkpoint again with rlekf-export"
        )
    meta = json.loads(extra[META_FILE])
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} was exported in format version {version}, this rlekf reads version "
            f"{FORMAT_VERSION}; re-export the checkpoint with this rlekf's rlekf-export (or "
            "load the file with the rlekf version that wrote it)"
        )
    module.eval()
    return module, meta


# ------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> Path:
    """``rlekf-export CKPT [-o OUT]``: write a TorchScript model next to the checkpoint."""
    parser = argparse.ArgumentParser(
        prog="rlekf-export",
        description="Export a trained rlekf checkpoint as a self-contained TorchScript file.",
    )
    parser.add_argument("checkpoint", help=".ckpt file written by rlekf-train")
    parser.add_argument(
        "-o", "--output", default=None, help="output file (default: <checkpoint stem>.pt)"
    )
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    out = Path(args.output) if args.output else ckpt.with_suffix(".pt")
    path = export_model(ckpt, out)
    _, meta = load_exported(path)
    print(
        f"exported {ckpt} -> {path} (format {meta['format_version']}, type_map "
        f"{meta['type_map']}, rcut {meta['rcut']} Å, sel {meta['sel']}, {meta['dtype']})"
    )
    return path


if __name__ == "__main__":
    main()
