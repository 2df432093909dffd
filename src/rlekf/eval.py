"""``rlekf-eval``: errors of a trained checkpoint on any data set, with CSVs and a parity plot.

``rlekf-eval ckpt_path=... [data=...] [split=test|val|train|all] [group_by=<info key>]``
(``group_by``: errors per frame group too, e.g. ``group_by=group`` for the mlearn sets).
Virial (eV/atom) and stress (GPa) errors are reported when the data has virial labels, with
whether the checkpoint was trained on virials (``trained_on_virials`` in ``metrics.json`` when
known). The model is rebuilt from the checkpoint alone (its ``model_config``), so the ``model``
config group plays no part; the data set is read with the checkpoint's type map, cutoff and
``sel``. Outputs go to the run folder (see :func:`rlekf.evaluation.write_outputs`); metrics and
the parity plot are logged to the configured loggers (``logger=wandb``, ``logger=csv``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from rlekf.data.neighbors import NeighborOverflowError
from rlekf.data.readers import DataError
from rlekf.evaluation import (
    GROUPS_JSON,
    format_group_table,
    format_metrics,
    frame_groups,
    metrics_by_group,
    predict,
    select_frames,
    write_outputs,
)
from rlekf.export import load_checkpoint_with_info
from rlekf.utils.env import wandb_offline_by_default
from rlekf.utils.instantiate import CONFIG_DIR, instantiate_many

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate ``cfg.ckpt_path`` on ``cfg.data`` (split ``cfg.split``); returns the metrics.

    Raises:
        ValueError: not an rlekf checkpoint, an element of the data missing from the
            checkpoint's type map, or more neighbours than the checkpoint's ``sel``.
    """
    wandb_offline_by_default()
    device = cfg.get("device", "cpu")
    ckpt = Path(str(cfg.ckpt_path))
    trust = bool(cfg.get("trust_checkpoint", False))
    model, config, info = load_checkpoint_with_info(ckpt, device, trust_checkpoint=trust)
    log.info(
        "model from %s: %s (trained on virials: %s)", ckpt, config, info["trained_on_virials"]
    )
    model_keys = ("type_map", "rcut", "rcut_smth", "sel", "dtype")
    datamodule = hydra.utils.instantiate(cfg.data, **{k: config[k] for k in model_keys})
    split = str(cfg.get("split", "test"))
    try:
        dataset = select_frames(datamodule, split)
    except DataError as exc:
        if exc.reason == "element not in type_map":
            what = str(exc).removesuffix("; add it to model.type_map")
            raise ValueError(
                f"checkpoint {ckpt} was trained for elements {config['type_map']} only, but "
                f"the data holds another one ({what}); evaluate it on data of those elements, "
                "or use a checkpoint trained with every element of the data"
            ) from exc
        if isinstance(exc.__cause__, NeighborOverflowError):
            raise ValueError(
                f"the data has denser environments than checkpoint {ckpt} (sel "
                f"{config['sel']}) allows: {exc}. A trained model's sel is fixed; use a model "
                "trained with a larger sel"
            ) from exc
        raise
    if len(dataset) == 0:
        raise ValueError(f"no frames to evaluate in the {split!r} split of {datamodule.paths}")
    result = predict(
        model,
        dataset,
        batch_size=int(cfg.get("batch_size", 8)),
        device=device,
        progress=bool(cfg.get("progress", False)),
    )
    out_dir = Path(cfg.paths.output_dir)
    title = f"{ckpt.name} on {split} split of {', '.join(Path(p).name for p in datamodule.paths)}"
    metrics, paths = write_outputs(result, out_dir, title)
    if "virial_rmse" in metrics and info["trained_on_virials"] is not None:
        metrics["trained_on_virials"] = float(info["trained_on_virials"])
        paths["metrics"].write_text(json.dumps(metrics, indent=1))
    print(format_metrics(metrics, title, info["trained_on_virials"]))
    group_by = cfg.get("group_by")
    if group_by:
        groups = metrics_by_group(result, frame_groups(result, str(group_by)))
        paths["metrics_by_group"] = out_dir / GROUPS_JSON
        paths["metrics_by_group"].write_text(json.dumps(groups, indent=1))
        print(f"by {group_by}:")
        print(format_group_table(groups))
    for name, path in paths.items():
        print(f"{name}: {path}")
    _log(cfg, metrics, paths)
    return metrics


def _log(cfg: DictConfig, metrics: dict[str, float], paths: dict[str, Path]) -> None:
    loggers = instantiate_many(cfg.get("logger"), "logger")
    if not loggers:
        return
    values = {f"eval/{k}": v for k, v in metrics.items()}
    is_wandb = False
    for lg in loggers:
        lg.log_metrics(values)
        if type(lg).__name__ == "WandbLogger":
            is_wandb = True
            lg.log_image(key="eval/parity", images=[str(paths["parity"])])
        lg.save()
    if is_wandb:
        import wandb

        wandb.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def _app(cfg: DictConfig) -> Any:
    evaluate(cfg)


def main() -> int:
    """``rlekf-eval ckpt_path=... [overrides]``; returns the exit status (0 on success).

    ``--trust-checkpoint`` is accepted as the override ``trust_checkpoint=true``. On an error
    Hydra prints it and exits with status 1.
    """
    sys.argv = ["trust_checkpoint=true" if a == "--trust-checkpoint" else a for a in sys.argv]
    _app()
    return 0


if __name__ == "__main__":
    sys.exit(main())
