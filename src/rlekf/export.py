"""Load trained checkpoints and export them as self-contained TorchScript files (``rlekf-export``).

A Lightning checkpoint written by ``rlekf-train`` holds the weights under ``state_dict``
(``model.*``) and the :class:`~rlekf.models.DeepPotential` keyword arguments under
``model_config``; :func:`load_checkpoint` rebuilds the model from those alone, so no Hydra
config is needed.

:func:`export_model` compiles the model itself with ``torch.jit.script`` (the same
:meth:`DeepPotential.forward` that training runs) and saves it with :func:`torch.jit.save`,
with JSON metadata beside it. The file loads with plain ``torch.jit.load`` (no rlekf import
needed)::

    import json, torch
    extra = {"rlekf.json": ""}
    model = torch.jit.load("model.pt", _extra_files=extra)
    meta = json.loads(extra["rlekf.json"])  # type_map, rcut, rcut_smth, sel, format_version
    batch = {"positions": positions, "cell": cell, "types": types, "batch": batch_index,
             "neighbors": neighbors, "shifts": shifts}
    out = model(batch, True, True)  # forces, virial
    out["energy"], out["forces"], out["virial"], out["atom_energy"]

Inputs are keyed by :mod:`rlekf.keys`: positions (N, 3) Å, cell (B, 3, 3) Å, types (N,) int64,
batch (N,) int64, neighbors (N, sum(sel)) int64 (-1 = empty slot, per-type slot layout of
:func:`rlekf.data.neighbors.slot_neighbors`), shifts (N, sum(sel), 3) integer cell shifts.
Outputs: energy (B,) eV, atom_energy (N,) eV, forces (N, 3) eV/Å when the second argument is
true, virial (B, 3, 3) eV (``-stress·volume``) when the third is. Call it with gradients enabled
(not inside ``torch.no_grad()``): forces are autograd derivatives.

Files of format version 1 (rlekf before the model itself was scriptable) took the six tensors
positionally plus a ``virial`` flag; :func:`load_exported` still reads them and presents them
with the same call as version 2.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import pickle
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from rlekf import keys as K
from rlekf.models.deep_potential import DeepPotential

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "READABLE_VERSIONS",
    "UntrustedCheckpointError",
    "export_model",
    "load_checkpoint",
    "load_checkpoint_with_info",
    "load_exported",
    "main",
]

#: Version of the exported file layout; bump when inputs, outputs or required metadata change
#: (an added optional key such as ``trained_on_virials`` does not: older readers ignore it).
FORMAT_VERSION: int = 2

#: Older format versions :func:`load_exported` still reads.
READABLE_VERSIONS: tuple[int, ...] = (1, 2)

#: Name of the JSON metadata stored in the TorchScript archive (``_extra_files``).
META_FILE: str = "rlekf.json"

PathLike = str | os.PathLike

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------ checkpoints
class UntrustedCheckpointError(ValueError):
    """A checkpoint needs full unpickling (which can run code) and was not marked trusted."""


def _torch_load(path: Path, trust_checkpoint: bool) -> Any:
    """``torch.load`` with ``weights_only=True``; full unpickling only when trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = exc
    except Exception as exc:  # noqa: BLE001 - any other failure means "not a torch file"
        raise _unreadable(path, exc) from exc
    if not trust_checkpoint:
        raise UntrustedCheckpointError(
            f"refusing to load {path}: it holds objects that only full unpickling rebuilds "
            f"({_reason(refused)}), and full unpickling can run arbitrary code "
            "from the file. Checkpoints written by rlekf-train never need it. If you trust "
            "where the file comes from, pass trust_checkpoint=True (--trust-checkpoint on the "
            "command line, trust_checkpoint=true for rlekf-eval)"
        ) from refused
    log.warning(
        "%s is not loadable with weights_only=True (%s); unpickling it in full because "
        "trust_checkpoint is set",
        path,
        _reason(refused),
    )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise _unreadable(path, exc) from exc


def _reason(exc: Exception) -> str:
    """The line of torch's weights_only refusal that names the offending global."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(". ")[0].strip()
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _unreadable(path: Path, exc: Exception) -> ValueError:
    return ValueError(
        f"cannot read {path} as a torch checkpoint ({type(exc).__name__}: {exc}); give a "
        ".ckpt written by rlekf-train (for an exported model use load_exported / "
        "DPCalculator.from_file)"
    )


def load_checkpoint(
    path: PathLike, device: str | torch.device = "cpu", *, trust_checkpoint: bool = False
) -> tuple[DeepPotential, dict[str, Any]]:
    """Rebuild the trained :class:`DeepPotential` of a Lightning checkpoint.

    Same as :func:`load_checkpoint_with_info` without its third value.
    """
    model, config, _ = load_checkpoint_with_info(path, device, trust_checkpoint=trust_checkpoint)
    return model, config


def load_checkpoint_with_info(
    path: PathLike, device: str | torch.device = "cpu", *, trust_checkpoint: bool = False
) -> tuple[DeepPotential, dict[str, Any], dict[str, Any]]:
    """Rebuild the trained :class:`DeepPotential` of a Lightning checkpoint, with its training
    facts.

    The model is built from the checkpoint's ``model_config`` (not from any Hydra config), so a
    checkpoint of any size, cutoff or type map loads.

    The file is read with ``torch.load(..., weights_only=True)``, which only rebuilds tensors,
    numbers, strings and containers and never runs code from the file; everything rlekf writes
    loads this way. A file that needs full unpickling is refused unless ``trust_checkpoint`` is
    true: unpickling can execute arbitrary code, so a ``.ckpt`` from an unknown source must not
    get it.

    Args:
        path: ``.ckpt`` file written by ``rlekf-train``.
        device: where to put the model.
        trust_checkpoint: allow full unpickling when ``weights_only`` refuses the file (only
            for files whose origin you trust).

    Returns:
        The model in eval mode, the checkpoint's ``model_config`` and ``{"trained_on_virials":
        True | False | None}`` (whether the weights were fitted to virial labels; ``None`` for
        a checkpoint written before rlekf recorded it).

    Raises:
        FileNotFoundError: no such file.
        UntrustedCheckpointError: the file holds objects that only full unpickling rebuilds,
            and ``trust_checkpoint`` is false.
        ValueError: the file is not an rlekf training checkpoint, or its weights do not fit
            its ``model_config``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found; give the path of a .ckpt file")
    ckpt = _torch_load(path, trust_checkpoint)
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
    flag = ckpt.get("trained_on_virials")
    return model, config, {"trained_on_virials": None if flag is None else bool(flag)}


# ------------------------------------------------------------------------------ TorchScript
class _FormatV1(nn.Module):
    """A format-1 export (positional inputs) behind the format-2 call ``module(batch, ...)``.

    Attributes ``type_map``, ``rcut``, ``rcut_smth`` and ``sel`` are those of the wrapped file.
    """

    def __init__(self, module: torch.jit.ScriptModule) -> None:
        super().__init__()
        self.module = module
        self.type_map = list(module.type_map)
        self.rcut, self.rcut_smth = float(module.rcut), float(module.rcut_smth)
        self.sel = [int(s) for s in module.sel]

    def forward(
        self,
        batch: dict[str, Tensor],
        forces: bool = True,
        virial: bool = False,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        if create_graph:
            raise ValueError("a format-1 export cannot keep the graph of its forces")
        keys = (K.POSITIONS, K.CELL, K.TYPES, K.BATCH, K.NEIGHBORS, K.SHIFTS)
        out = dict(self.module(*(batch[k] for k in keys), virial))
        if not forces:
            out.pop(K.FORCES)
        if not virial:
            out.pop(K.VIRIAL)
        return out


def _metadata(
    model: DeepPotential, config: dict[str, Any], source: str, trained_on_virials: bool | None
) -> dict[str, Any]:
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
        "trained_on_virials": trained_on_virials,
        "rlekf_version": __version__,
    }


def export_model(
    model: DeepPotential | PathLike,
    out: PathLike,
    *,
    trust_checkpoint: bool = False,
    trained_on_virials: bool | None = None,
) -> Path:
    """Script a trained model and save it as a self-contained TorchScript file.

    Args:
        model: a trained :class:`DeepPotential` or the path of a checkpoint.
        out: output file (conventionally ``.pt``); parent folders are created.
        trust_checkpoint: see :func:`load_checkpoint`.
        trained_on_virials: stored in the metadata (``None`` = unknown); for a checkpoint
            path the checkpoint's own flag is used when this is ``None``.

    Returns:
        The path written.
    """
    source = "<memory>"
    if isinstance(model, (str, os.PathLike)):
        source = str(model)
        model, config, info = load_checkpoint_with_info(model, trust_checkpoint=trust_checkpoint)
        if trained_on_virials is None:
            trained_on_virials = info["trained_on_virials"]
    else:
        config = dict(model.config)
    model = copy.deepcopy(model).to("cpu").eval()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps(_metadata(model, config, source, trained_on_virials), indent=1)
    with _quiet_jit():
        scripted = torch.jit.script(model)
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
        The module (eval mode), called as ``module(batch, forces, virial)`` like
        :class:`DeepPotential` (a format-1 file comes wrapped to take that call), and its
        metadata (``type_map``, ``rcut``, ``rcut_smth``, ``sel``, ``dtype``,
        ``format_version``, ``model_config``, ``trained_on_virials`` (true/false, null or
        absent when unknown), ...).

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
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{path} was exported in format version {version}, this rlekf reads versions "
            f"{list(READABLE_VERSIONS)}; re-export the checkpoint with this rlekf's rlekf-export "
            "(or load the file with the rlekf version that wrote it)"
        )
    module.eval()
    if version == 1:
        return _FormatV1(module).eval(), meta
    return module, meta


# ------------------------------------------------------------------------------ CLI
def main(argv: list[str] | None = None) -> int:
    """``rlekf-export CKPT [-o OUT]``: write a TorchScript model next to the checkpoint.

    Returns:
        The exit status: 0 on success, 1 (with a message on stderr) when the checkpoint cannot
        be used.
    """
    parser = argparse.ArgumentParser(
        prog="rlekf-export",
        description="Export a trained rlekf checkpoint as a self-contained TorchScript file.",
    )
    parser.add_argument("checkpoint", help=".ckpt file written by rlekf-train")
    parser.add_argument(
        "-o",
        "--output",
        default=None,
        help="output file (default: <checkpoint stem>.pt, or .dp with --format deepmd)",
    )
    parser.add_argument(
        "--format",
        choices=("torchscript", "deepmd"),
        default="torchscript",
        help="torchscript (default): rlekf's TorchScript file; deepmd: DeePMD-kit 3.2's model "
        "format (.dp or .yaml) for dp test, dp convert-backend and LAMMPS (rlekf.interop.deepmd)",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow full unpickling of a checkpoint that weights_only loading refuses (it can "
        "run code from the file: only for files you trust; rlekf's own never need it)",
    )
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    if args.format == "deepmd":
        return _main_deepmd(ckpt, args.output, args.trust_checkpoint)
    out = Path(args.output) if args.output else ckpt.with_suffix(".pt")
    try:
        path = export_model(ckpt, out, trust_checkpoint=args.trust_checkpoint)
        _, meta = load_exported(path)
    except (OSError, ValueError) as exc:
        print(f"rlekf-export: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"exported {ckpt} -> {path} (format {meta['format_version']}, type_map "
        f"{meta['type_map']}, rcut {meta['rcut']} Å, sel {meta['sel']}, {meta['dtype']})"
    )
    return 0


def _main_deepmd(ckpt: Path, output: str | None, trust_checkpoint: bool) -> int:
    from rlekf.interop.deepmd import DEEPMD_KIT_VERSION, export_deepmd, from_deepmd, read_deepmd

    out = Path(output) if output else ckpt.with_suffix(".dp")
    try:
        path = export_deepmd(ckpt, out, trust_checkpoint=trust_checkpoint)
        model = from_deepmd(read_deepmd(path), where=str(path))
    except (OSError, ValueError) as exc:
        print(f"rlekf-export: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"exported {ckpt} -> {path} (DeePMD-kit {DEEPMD_KIT_VERSION} format, se_e2_a, type_map "
        f"{model.type_map}, rcut {model.rcut} Å, sel {model.sel}, {model.config['dtype']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
