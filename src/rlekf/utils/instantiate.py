"""The Hydra entry points' shared glue: where the configs are, the W&B default, and
instantiating lists of callbacks and loggers, and the model, from Hydra configs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

# re-exported: the entry points imported these from here before rlekf.utils.env existed
from rlekf.utils.env import (  # noqa: F401
    cpu_vendor,
    reproducible_blas_by_default,
    wandb_offline_by_default,
)

log = logging.getLogger(__name__)

#: ``configs/`` at the repository root (editable install); ``RLEKF_CONFIG_DIR`` overrides it.
CONFIG_DIR = os.environ.get(
    "RLEKF_CONFIG_DIR", str(Path(__file__).resolve().parents[3] / "configs")
)


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
