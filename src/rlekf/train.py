"""``rlekf-train``: compose the config, build data/model/task/trainer, fit, test.

Thin Hydra entry point; all logic lives in the library. W&B runs offline unless
``WANDB_MODE`` says otherwise. ``ckpt_path=...`` resumes a run; ``ckpt_init=...`` starts a new
run from a trained checkpoint (fine-tuning, :mod:`rlekf.finetune`).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf, open_dict

from rlekf.training.metrics import check_monitor
from rlekf.utils.env import reproducible_blas_by_default, wandb_offline_by_default
from rlekf.utils.instantiate import CONFIG_DIR, instantiate_many, instantiate_model, print_config

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit (and optionally test) as the config says; returns (metrics, objects)."""
    wandb_offline_by_default()
    reproducible_blas_by_default()
    if cfg.get("extras", {}).get("ignore_warnings"):
        warnings.filterwarnings("ignore")
    if cfg.get("extras", {}).get("print_config"):
        print_config(cfg)
    check_monitor(cfg.get("monitor"), cfg.get("task", {}).get("score_scales"))
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    init = None
    if cfg.get("ckpt_init"):
        init, datamodule, model = _finetune_start(cfg)
    else:
        datamodule = hydra.utils.instantiate(cfg.data)
        model = instantiate_model(cfg.model, datamodule)  # data.sel=auto chooses sel here
    task = hydra.utils.instantiate(cfg.task, model=model)
    callbacks = instantiate_many(cfg.get("callbacks"), "callback")
    if init is not None:
        callbacks.append(init)
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


def _finetune_start(cfg: DictConfig) -> tuple[Any, Any, Any]:
    """``ckpt_init``: the checkpoint's model (weights, statistics, energy bias) and a data
    module read with its type map, cutoffs and ``sel``; returns ``(FineTuneInit callback, data
    module, model)``. The ``model`` config group plays no part (``cfg.model`` is replaced by the
    checkpoint's ``model_config`` so that the logged config says what was trained).

    Raises:
        ValueError: the data holds elements the checkpoint has no networks for, or denser
            environments than its ``sel``; a bad ``finetune`` option (see
            :func:`rlekf.finetune.init_optimizer`).
    """
    from ase.data import chemical_symbols

    from rlekf.data.neighbors import NeighborOverflowError
    from rlekf.data.readers import DataError, read_frames_with_report
    from rlekf.finetune import (
        FINETUNE_KEY,
        check_new_elements,
        read_init_checkpoint,
        refit_energy_bias,
        validate_finetune_options,
    )
    from rlekf.training.finetune import FineTuneInit

    ft = cfg.get("finetune") or {}
    path = str(cfg.ckpt_init)
    bias = str(ft.get("bias", "keep"))
    validate_finetune_options(
        str(ft.get("covariance", "keep")), ft.get("inflate"), ft.get("lambda0"), bias
    )
    init = read_init_checkpoint(path, trust_checkpoint=bool(ft.get("trust_checkpoint", False)))
    config = init.model_config
    configured = OmegaConf.select(cfg, "data.type_map", default=None, throw_on_missing=False)
    if configured is not None and set(configured) - set(config["type_map"]):
        log.warning(
            "data.type_map %s lists elements that checkpoint %s (type_map %s) has no networks "
            "for; the data is read with the checkpoint's type map",
            list(configured),
            path,
            config["type_map"],
        )
    with open_dict(cfg):
        cfg.model = OmegaConf.create({"_target_": "rlekf.models.DeepPotential", **config})
        for key, value in init.data_overrides().items():
            cfg.data[key] = value
    datamodule = hydra.utils.instantiate(cfg.data)
    try:
        datamodule.setup("fit")
    except DataError as exc:
        if exc.reason == "element not in type_map":
            paths = [*datamodule.paths, *datamodule.val_paths, *datamodule.test_paths]
            frames, _ = read_frames_with_report(paths, datamodule.fmt, on_error="skip")
            symbols = {chemical_symbols[int(z)] for f in frames for z in set(f.numbers.tolist())}
            check_new_elements(symbols, config["type_map"], ", ".join(map(str, paths)))
        if isinstance(exc.__cause__, NeighborOverflowError):
            raise ValueError(
                f"the data has denser environments than checkpoint {path} (sel {config['sel']}) "
                f"allows: {exc}. A trained model's sel is fixed; fine-tune a model trained with "
                "a larger sel"
            ) from exc
        raise
    model = init.model
    options = OmegaConf.to_container(ft) if isinstance(ft, DictConfig) else dict(ft)
    record = {"ckpt_init": path, "epoch": init.epoch, **options}
    record.pop("trust_checkpoint", None)
    if cfg.get("ckpt_path"):
        log.info("ckpt_path given: resuming that run (ckpt_init %s only fixes the model)", path)
    elif bias == "refit":
        change = refit_energy_bias(model, datamodule.datasets["train"])
        log.info("energy bias refitted on the training split:\n%s", change.summary())
        print(f"energy bias refitted on the training split:\n{change.summary()}")
        record["bias_change"] = change.record()
    callback = FineTuneInit(
        init.optimizer_state,
        record,
        covariance=str(ft.get("covariance", "keep")),
        inflate=ft.get("inflate"),
        lambda0=ft.get("lambda0"),
        where=path,
    )
    log.info("%s: new run from %s (epoch %s)", FINETUNE_KEY, path, init.epoch)
    return callback, datamodule, model


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
