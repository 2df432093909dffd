"""The Hydra entry points' shared glue: where the configs are, the W&B default, and
instantiating lists of callbacks and loggers, and the model, from Hydra configs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

#: ``configs/`` at the repository root (editable install); ``RLEKF_CONFIG_DIR`` overrides it.
CONFIG_DIR = os.environ.get(
    "RLEKF_CONFIG_DIR", str(Path(__file__).resolve().parents[3] / "configs")
)


def wandb_offline_by_default() -> None:
    """W&B runs offline unless ``WANDB_MODE`` says otherwise (called by the entry points)."""
    os.environ.setdefault("WANDB_MODE", "offline")


def cpu_vendor() -> str:
    """The CPU's ``vendor_id`` from ``/proc/cpuinfo`` (``"GenuineIntel"``, ``"AuthenticAMD"``;
    ``""`` where there is none, e.g. off Linux or on ARM)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def reproducible_blas_by_default(vendor: str | None = None) -> None:
    """Intel MKL runs in a reproducible mode unless ``MKL_CBWR`` says otherwise.

    Called by ``rlekf-train`` before any computation. In MKL's default mode the bits of a
    result may depend on the operands' memory alignment, so a resumed run could differ from an
    uninterrupted one in the last bit (seen on an AVX-512 Intel Xeon and on an AMD EPYC). On
    Intel CPUs ``MKL_CBWR=AUTO,STRICT`` keeps MKL's fastest code path and makes it independent of
    alignment; MKL's strict mode is for Intel CPUs, and on the AMD EPYC it did not suffice, so
    other CPUs get ``MKL_CBWR=COMPATIBLE`` (MKL's most portable code path). Set ``MKL_CBWR=AUTO``
    to opt out.

    Args:
        vendor: the CPU vendor (default: :func:`cpu_vendor`).
    """
    vendor = cpu_vendor() if vendor is None else vendor
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT" if vendor == "GenuineIntel" else "COMPATIBLE")


def instantiate_many(cfg: DictConfig | None, what: str) -> list[Any]:
    """Instantiate every ``_target_`` node directly under ``cfg`` (callbacks or loggers)."""
    out: list[Any] = []
    if not cfg:
        return out
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{what} config must be a mapping of name -> node, got {type(cfg)}")
    for name, node in cfg.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            log.info("instantiating %s <%s>", what, node._target_)
            out.append(hydra.utils.instantiate(node))
        elif node is not None:
            log.debug("skipping %s entry %s without _target_", what, name)
    return out


def instantiate_model(cfg: DictConfig, datamodule: Any) -> Any:
    """Instantiate ``cfg`` (the model node); ``sel: auto`` takes the data module's choice.

    With ``data.sel=auto`` the model's ``sel`` (``${data.sel}``) is the string ``auto``; the
    data module then counts neighbours over its training frames (``resolve_sel``) and the model
    is built with that list, which its checkpoint stores in ``model_config``.
    """
    sel = OmegaConf.select(cfg, "sel", default=None)
    if isinstance(sel, str) and sel.startswith("auto") and hasattr(datamodule, "resolve_sel"):
        chosen = datamodule.resolve_sel()
        print(f"sel={sel}: {chosen} ({getattr(datamodule, 'sel_info', None)})")
        return hydra.utils.instantiate(cfg, sel=chosen)
    return hydra.utils.instantiate(cfg)


def print_config(cfg: DictConfig) -> None:
    """Print the resolved config as a rich tree."""
    import rich.syntax
    import rich.tree
    from rich import print as rprint

    tree = rich.tree.Tree("CONFIG")
    for key in cfg:
        branch = tree.add(str(key))
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rprint(tree)
