"""``rlekf-bench --profile`` (``make profile``): where the time of a training step goes.

For each optimizer (default ``rlekf`` in paper mode, ``rlekf_fused`` and ``adam``) it trains
``--batches`` batches (after ``--warmup`` untimed ones) of one data preset (default
``cu_pwmat`` from ``../shared/data``; ``cu_emt`` when that is absent) through the real
Lightning training loop — the same config as ``rlekf-train``, without validation, checkpoints,
logger or progress bar — and splits the training time with
:class:`~rlekf.training.callbacks.StepTimer`:

* **optimizer update**: inside the optimizer's public ``step``/``step_k`` (for RLEKF the
  covariance update and the weight increment; for Adam its moment update);
* **model forward**: the Deep Potential's forward passes (energy, and for force measurements
  the force derivative with ``create_graph``);
* **backward and rest of step**: the rest of ``training_step`` — the (double) backward passes
  of the measurements or of the loss, plus the module's metrics and logging;
* **between steps**: data loading, collation and the training loop.

It is a fixed number of batches, not a whole epoch (``est. s/epoch`` scales the timed batches
to the epoch's batch count); validation is never timed. Percentages are of the total step time,
and ``× Adam`` is the time per frame relative to Adam's in the same run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import math
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["format_profile", "main", "profile", "profile_optimizer"]

OPTIMS = ("rlekf", "rlekf_fused", "adam")
PARTS = (
    ("optimizer_s", "optimizer update (`step`/`step_k`)"),
    ("forward_s", "model forward"),
    ("rest_of_step_s", "backward + rest of step"),
    ("between_s", "between steps (data, loop)"),
)


def _shared_data_dir() -> Path:
    env = os.environ.get("RLEKF_SHARED_DATA")
    if env:
        return Path(env)
    root = Path(os.environ.get("RLEKF_ROOT", "."))
    return root.resolve() / ".." / "shared" / "data"


def resolve_data(data: str) -> tuple[str, str]:
    """``(preset, note)``: ``cu_pwmat`` falls back to ``cu_emt`` when the shared data is absent."""
    if data == "cu_pwmat" and not (_shared_data_dir() / "cu_pwmat").is_dir():
        return "cu_emt", f"cu_pwmat not found under {_shared_data_dir()}: used cu_emt"
    return data, ""


def compose(overrides: list[str]):
    """The ``rlekf-train`` config with ``overrides`` (Hydra compose API, no run folder)."""
    from hydra import compose as _compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlekf.utils.instantiate import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return _compose(config_name="train", overrides=overrides)


def profile_optimizer(
    data: str,
    optim: str,
    *,
    batches: int = 20,
    warmup: int = 2,
    overrides: list[str] | None = None,
    seed: int = 0,
    work: Path | None = None,
) -> dict[str, Any]:
    """Train ``warmup + batches`` batches of ``data`` with ``optim``; return the timed split.

    Args:
        data: a data preset (``configs/data/<data>.yaml``).
        optim: an optimizer preset (``configs/optim/<optim>.yaml``).
        batches: timed training batches (one epoch at most: fewer if the epoch is shorter).
        warmup: untimed batches before them (first-call costs).
        overrides: more Hydra overrides (e.g. ``trainer=gpu``, ``model=small``).
        seed: the run's seed.
        work: folder for the split files (default: a temporary one).

    Returns:
        :meth:`StepTimer.summary` plus ``optim``, ``data``, ``batches_per_epoch``,
        ``frames_per_epoch`` and ``fit_s`` (wall-clock of the whole ``fit``, set-up included).
    """
    import hydra
    import lightning as L

    from rlekf.training.callbacks import StepTimer

    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    work = Path(work) if work is not None else Path(tempfile.mkdtemp(prefix="rlekf-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    cfg = compose(
        [
            f"data={data}",
            f"optim={optim}",
            "logger=none",
            "callbacks=none",
            "extras.print_config=false",
            f"seed={seed}",
            f"paths.output_dir={work}",
            *(overrides or []),
        ]
    )
    L.seed_everything(seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.data)
    model = hydra.utils.instantiate(cfg.model)
    task = hydra.utils.instantiate(cfg.task, model=model)
    timer = StepTimer(warmup=warmup)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=[timer],
        logger=False,
        min_epochs=1,
        max_epochs=1,
        limit_train_batches=warmup + batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    t0 = time.perf_counter()
    trainer.fit(task, datamodule=datamodule)
    fit_s = time.perf_counter() - t0
    out = timer.summary()
    n_train = len(datamodule.datasets["train"]) if getattr(datamodule, "datasets", None) else None
    loader = datamodule.train_dataloader()
    out.update(
        optim=optim,
        data=data,
        batches_per_epoch=len(loader),
        frames_per_epoch=n_train,
        fit_s=fit_s,
    )
    return out


def profile(
    data: str = "cu_pwmat",
    optims: tuple[str, ...] | list[str] = OPTIMS,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`profile_optimizer` for each of ``optims`` on the same data; ``ratio_to_adam``
    (time per frame over Adam's) is added when ``adam`` is among them."""
    rows = [profile_optimizer(data, o, **kwargs) for o in optims]
    adam = next((r for r in rows if r["optim"] == "adam"), None)
    for r in rows:
        r["s_per_frame"] = r["total_s"] / max(r["frames"], 1)
        r["s_per_epoch_est"] = r["total_s"] / max(r["batches"], 1) * r["batches_per_epoch"]
    for r in rows:
        r["ratio_to_adam"] = r["s_per_frame"] / adam["s_per_frame"] if adam else float("nan")
    return rows


def format_profile(rows: list[dict[str, Any]], note: str = "") -> str:
    """A Markdown table of :func:`profile` rows (percentages of the total step time)."""
    head = [
        "optimizer",
        "batches (frames) timed",
        "ms/frame",
        *(h for _, h in PARTS),
        "× Adam (per frame)",
        "est. s/epoch",
        "optimizer calls/batch",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        total = r["total_s"] or float("nan")
        cells = [
            r["optim"],
            f"{r['batches']} ({r['frames']})",
            f"{1e3 * r['s_per_frame']:.1f}",
            *(f"{100 * r[k] / total:.0f} %" for k, _ in PARTS),
            "–" if math.isnan(r["ratio_to_adam"]) else f"{r['ratio_to_adam']:.2f}",
            f"{r['s_per_epoch_est']:.1f}",
            f"{r['optimizer_calls'] / max(r['batches'], 1):g}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average n/a"


def main(argv: list[str] | None = None) -> int:
    """Command line (``rlekf-bench --profile ...``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="rlekf-bench --profile",
        description="Profile of training steps: optimizer update, model forward, backward and "
        "the rest, per optimizer (training time only; a fixed number of batches).",
    )
    parser.add_argument("--data", default="cu_pwmat", help="data preset (default cu_pwmat)")
    parser.add_argument("--optims", nargs="+", default=list(OPTIMS), help="optimizer presets")
    parser.add_argument("--batches", type=int, default=20, help="timed batches per optimizer")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches before them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--extra", nargs="*", default=[], help="Hydra overrides for every run")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("--tag", default=None, help="file tag (default: host name)")
    args = parser.parse_args(argv)
    from rlekf.bench import machine_name

    data, note = resolve_data(args.data)
    extra = list(args.extra)
    if not any(o.lstrip("+~").startswith("trainer=") for o in extra):
        extra.insert(0, "trainer=cpu")
    rows = profile(
        data,
        args.optims,
        batches=args.batches,
        warmup=args.warmup,
        overrides=extra,
        seed=args.seed,
    )
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    head = (
        f"Profile of a training step, `{data}`, {args.batches} timed batches after "
        f"{args.warmup} warm-up per optimizer (not a whole epoch); {stamp}; "
        f"{machine_name('cpu' if 'trainer=cpu' in extra else None)}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; {_load()} at the end."
    )
    text = head + "\n\n" + format_profile(rows, note)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    host = args.tag or platform.node() or "host"
    path = args.out / f"{_dt.date.today().isoformat()}-{host}-profile-{data}.md"
    path.write_text(text)
    print(f"[profile] wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
