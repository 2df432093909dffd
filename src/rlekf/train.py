"""``rlekf-train``: compose the config, build data/model/task/trainer, fit, test.

Thin Hydra entry point; all logic lives in the library. W&B runs offline unless
``WANDB_MODE`` says otherwise.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from rlekf.utils.instantiate import (
    CONFIG_DIR,
    instantiate_many,
    instantiate_model,
    print_config,
    wandb_offline_by_default,
)

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit (and optionally test) as the config says; returns (metrics, objects)."""
    wandb_offline_by_default()
    if cfg.get("extras", {}).get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if cfg.get("extras", {}).get("print_config"):
        print_config(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = instantiate_model(cfg.model, datamodule)  # data.sel=auto chooses sel here
    task = hydra.utils.instantiate(cfg.task, model=model)
    callbacks = instantiate_many(cfg.get("callbacks"), "callback")
    loggers = instantiate_many(cfg.get("logger"), "logger")
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    objects = {"datamodule": datamodule, "model": model, "task": task, "trainer": trainer}
    try:
        if cfg.get("train", True):
            trainer.fit(task, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.get("test", False):
            best = (
                trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            )
            trainer.test(task, datamodule=datamodule, ckpt_path=best or None)
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    finally:
        _finish_wandb(loggers)
    summary = ", ".join(
        f"{k}={metrics[k]:.4g}"
        for k in sorted(metrics)
        if k.split("/")[-1] in ("energy_rmse", "force_rmse")
    )
    log.info("final metrics: %s (energy in eV/atom, force in eV/Å)", summary)
    print(f"final metrics: {summary} (energy in eV/atom, force in eV/Å)")
    return metrics, objects


def _finish_wandb(loggers: list[Any]) -> None:
    """Close W&B runs so consecutive multirun jobs do not share one (wandb#1314)."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Hydra app; returns the monitored metric for sweepers."""
    metrics, _ = train(cfg)
    value = metrics.get(cfg.get("optimized_metric", ""))
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
