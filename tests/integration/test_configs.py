"""Every option of every config group composes, and the objects it names instantiate."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest

from tests.helpers.hydra import CONFIG_DIR, compose_cfg


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


GROUPS = [
    "data",
    "model",
    "model/init",
    "optim",
    "task",
    "trainer",
    "callbacks",
    "logger",
    "experiment",
    "debug",
    "extras",
    "paths",
    "hydra",
]


@pytest.mark.parametrize(
    "override",
    [f"{g}={o}" for g in GROUPS for o in _options(g)],
)
def test_option_composes(override, tmp_path):
    extra = []
    if override.startswith("data=xyz"):
        extra = ["data.path=x.extxyz", "data.type_map=[Cu]"]
    cfg = compose_cfg("train", [override, *extra], tmp_path)
    assert cfg.model.type_map == cfg.data.type_map
    assert cfg.trainer.inference_mode is False


def test_eval_config_requires_checkpoint(tmp_path):
    cfg = compose_cfg("eval", ["ckpt_path=x.ckpt"], tmp_path)
    assert cfg.ckpt_path == "x.ckpt"


@pytest.mark.parametrize("optim", _options("optim"))
@pytest.mark.parametrize("init", _options("model/init"))
def test_model_and_task_instantiate(optim, init, tmp_path):
    cfg = compose_cfg("train", [f"optim={optim}", f"model/init={init}", "model=small"], tmp_path)
    model = hydra.utils.instantiate(cfg.model)
    task = hydra.utils.instantiate(cfg.task, model=model)
    opt = task.configure_optimizers()
    assert sum(p.numel() for p in opt.param_groups[0]["params"]) == sum(
        p.numel() for p in model.parameters()
    )


def test_callbacks_and_loggers_instantiate(tmp_path):
    from rlekf.utils.instantiate import instantiate_many

    cfg = compose_cfg("train", ["logger=many"], tmp_path)
    assert len(instantiate_many(cfg.callbacks, "callback")) == 7
    loggers = instantiate_many(cfg.logger, "logger")
    assert {type(lg).__name__ for lg in loggers} == {"CSVLogger", "WandbLogger"}


def test_gekf_refuses_above_memory_budget(tmp_path):
    cfg = compose_cfg(
        "train",
        ["optim=gekf", "data=water_deepmd", "optim.optimizer.max_p_bytes=8589934592"],
        tmp_path,
    )
    model = hydra.utils.instantiate(cfg.model)
    task = hydra.utils.instantiate(cfg.task, model=model)
    with pytest.raises(ValueError, match="GiB"):
        task.configure_optimizers()


def test_shared_paths_point_beside_the_clone(tmp_path):
    cfg = compose_cfg("train", ["data=cu_pwmat"], tmp_path)
    assert Path(cfg.data.path).parts[-3:] == ("data", "cu_pwmat", "0_300_MOVEMENT")


@pytest.mark.parametrize("name", ["train", "eval"])
def test_run_and_sweep_dirs_resolve_before_hydra_config_exists(name):
    """The multirun sweeper resolves hydra.sweep.dir before HydraConfig is set: no ${hydra:}."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None
    overrides = ["ckpt_path=x"] if name == "eval" else []
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    assert str(cfg.hydra.sweep.dir).startswith("./logs/")
    assert str(cfg.hydra.run.dir).startswith("./logs/")
