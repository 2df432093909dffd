"""``rlekf-change-bias``: refit a checkpoint's per-element energy bias on labelled frames.

``rlekf-change-bias CKPT [data=...] [split=all|train|val|test] [-o OUT]`` fits the energy
residual ``E_label - E_model`` of the frames against their element counts by least squares
(DeePMD-kit's ``dp change-bias``; :func:`rlekf.finetune.refit_energy_bias`), adds the
correction to the bias and writes a new checkpoint atomically: the weights, the optimizer
state (RLEKF's ``P``) and everything else are unchanged, and ``bias_changes`` in it records
what was changed and on which frames. Elements without atoms in the frames keep their bias.
Like ``rlekf-eval``, the model is rebuilt from the checkpoint and the data is read with its
type map, cutoffs and ``sel``.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from rlekf.data.neighbors import NeighborOverflowError
from rlekf.data.readers import DataError
from rlekf.evaluation import select_frames
from rlekf.export import load_checkpoint_with_info
from rlekf.finetune import (
    BiasChange,
    change_bias_checkpoint,
    load_raw_checkpoint,
    refit_energy_bias,
)
from rlekf.utils.instantiate import CONFIG_DIR
from rlekf.utils.io import atomic_write

__all__ = ["change_bias", "main"]

log = logging.getLogger(__name__)


def default_output(ckpt: Path) -> Path:
    """``<stem>_bias.ckpt`` beside ``ckpt``."""
    return ckpt.with_name(f"{ckpt.stem}_bias{ckpt.suffix or '.ckpt'}")


def change_bias(cfg: DictConfig) -> tuple[BiasChange, Path]:
    """Refit the bias of ``cfg.ckpt_path`` on ``cfg.data`` (split ``cfg.split``) and write
    ``cfg.output``; returns the change and the written path.

    Raises:
        ValueError: not an rlekf checkpoint, an element of the data missing from the
            checkpoint's type map, more neighbours than its ``sel``, or no frames.
    """
    ckpt = Path(str(cfg.ckpt_path))
    trust = bool(cfg.get("trust_checkpoint", False))
    device = str(cfg.get("device", "cpu"))
    model, config, _ = load_checkpoint_with_info(ckpt, device, trust_checkpoint=trust)
    keys = ("type_map", "rcut", "rcut_smth", "sel", "dtype")
    datamodule = hydra.utils.instantiate(cfg.data, **{k: config[k] for k in keys})
    split = str(cfg.get("split", "all"))
    try:
        dataset = select_frames(datamodule, split)
    except DataError as exc:
        if exc.reason == "element not in type_map":
            what = str(exc).removesuffix("; add it to model.type_map")
            raise ValueError(
                f"checkpoint {ckpt} has networks for elements {config['type_map']} only, but "
                f"the data holds another one ({what}); its bias cannot be fitted"
            ) from exc
        if isinstance(exc.__cause__, NeighborOverflowError):
            raise ValueError(
                f"the data has denser environments than checkpoint {ckpt} (sel "
                f"{config['sel']}) allows: {exc}"
            ) from exc
        raise
    if len(dataset) == 0:
        raise ValueError(f"no frames in the {split!r} split of {datamodule.paths}")
    change = refit_energy_bias(
        model, dataset, batch_size=int(cfg.get("batch_size", 8)), device=device
    )
    raw = load_raw_checkpoint(ckpt, trust_checkpoint=trust)
    new = change_bias_checkpoint(raw, change, source=str(ckpt), split=split)
    out = Path(str(cfg.output)) if cfg.get("output") else default_output(ckpt)
    atomic_write(out, lambda fh: torch.save(new, fh))
    print(f"energy bias of {ckpt} refitted on {change.n_frames} frames ({split}):")
    print(change.summary())
    print(f"written: {out}")
    return change, out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="change_bias")
def _app(cfg: DictConfig) -> Any:
    change_bias(cfg)


def _translate(argv: list[str]) -> list[str]:
    """``CKPT`` (first argument) -> ``ckpt_path=CKPT``; ``-o/--output OUT`` -> ``output=OUT``;
    ``--trust-checkpoint`` -> ``trust_checkpoint=true``; the rest is left to Hydra."""
    out: list[str] = []
    args = list(argv)
    if args and "=" not in args[0] and not args[0].startswith("-"):
        out.append(f"ckpt_path={args.pop(0)}")
    it = iter(args)
    for a in it:
        if a in ("-o", "--output"):
            value = next(it, None)
            if value is None:
                raise SystemExit(f"rlekf-change-bias: {a} needs a file name")
            out.append(f"output={value}")
        elif a.startswith("--output="):
            out.append(f"output={a.split('=', 1)[1]}")
        elif a == "--trust-checkpoint":
            out.append("trust_checkpoint=true")
        else:
            out.append(a)
    return out


def main() -> int:
    """``rlekf-change-bias CKPT [overrides] [-o OUT]``; returns the exit status (0 on success).

    On an error Hydra prints it and exits with status 1.
    """
    sys.argv = [sys.argv[0], *_translate(sys.argv[1:])]
    _app()
    return 0


if __name__ == "__main__":
    sys.exit(main())
