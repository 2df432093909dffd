"""Instantiate lists of callbacks and loggers from Hydra configs."""

from __future__ import annotations

import logging
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


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
