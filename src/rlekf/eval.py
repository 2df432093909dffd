"""``rlekf-eval``: test a checkpoint on a data set (``ckpt_path=... data=...``)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig

from rlekf.utils.instantiate import instantiate_many

log = logging.getLogger(__name__)

# configs/ at the repository root (editable install); RLEKF_CONFIG_DIR overrides
CONFIG_DIR = os.environ.get(
    "RLEKF_CONFIG_DIR", str(Path(__file__).resolve().parents[2] / "configs")
)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the test loop of ``cfg.ckpt_path`` on ``cfg.data``; returns the metrics."""
    L.seed_everything(cfg.get("seed", 0), workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    task = hydra.utils.instantiate(cfg.task, model=model)
    loggers = instantiate_many(cfg.get("logger"), "logger")
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False)
    trainer.test(task, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    print("test metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
