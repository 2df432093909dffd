"""Experiment-tracking callbacks: the RLEKF block partition and parity plots.

Both write a file into the run folder (``trainer.default_root_dir``) and, when a
:class:`~lightning.pytorch.loggers.WandbLogger` is attached, also log to W&B (a table plus
summary values for the partition, an image for the parity plots). The checkpoint is logged as a
W&B artifact by the logger itself when asked: ``logger.wandb.log_model=true`` (at the end) or
``all`` (every checkpoint). wandb is never imported here; no Hydra either.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from rlekf.data import keys as K

__all__ = ["BlockPartition", "ParityPlots", "parity_figure", "partition_table"]

log = logging.getLogger(__name__)

PARTITION_COLUMNS = ["block", "numel", "offset", "p_entries", "segments"]


def partition_table(blocks: Sequence[Any], names: Sequence[str]) -> list[list[Any]]:
    """Rows ``[block, numel, offset, p_entries, segments]`` describing an RLEKF partition.

    Args:
        blocks: :class:`~rlekf.optim.partition.Block` objects (``RLEKF.blocks``).
        names: parameter names in the optimizer's parameter order.

    Returns:
        One row per block; ``segments`` reads like ``"fitting.layers.0.weight[0:800] ..."``.
    """
    rows = []
    for b in blocks:
        segs = " ".join(f"{names[s.param_index]}[{s.start}:{s.stop}]" for s in b.segments)
        rows.append([b.index, b.numel, b.offset, b.numel**2, segs])
    return rows


def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


class BlockPartition(L.Callback):
    """Record the RLEKF block partition once, at the start of fit.

    Writes ``<run dir>/<filename>`` (CSV) and, with W&B, a table ``kf/block_partition`` plus the
    summary values ``kf/n_blocks``, ``kf/block_sizes`` and ``kf/p_bytes``. Does nothing for
    optimizers without blocks (Adam).

    Args:
        filename: name of the CSV file in the run folder.
    """

    def __init__(self, filename: str = "block_partition.csv") -> None:
        self.filename = filename

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        opt = trainer.optimizers[0] if trainer.optimizers else None
        blocks = getattr(opt, "blocks", None)
        if not blocks:
            return
        by_id = {id(p): n for n, p in pl_module.named_parameters()}
        params = [p for g in opt.param_groups for p in g["params"]]
        names = [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
        rows = partition_table(blocks, names)
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(PARTITION_COLUMNS)
            writer.writerows(rows)
        sizes = [r[1] for r in rows]
        for lg in _wandb_loggers(trainer):
            lg.log_table(key="kf/block_partition", columns=PARTITION_COLUMNS, data=rows)
            lg.experiment.summary.update(
                {
                    "kf/n_blocks": len(rows),
                    "kf/block_sizes": sizes,
                    "kf/p_bytes": int(getattr(opt, "p_bytes", 0)),
                }
            )


def parity_figure(
    energy_pred: np.ndarray,
    energy_label: np.ndarray,
    force_pred: np.ndarray,
    force_label: np.ndarray,
    title: str = "",
):
    """Predicted vs label energies (eV/atom) and force components (eV/Å), RMSE in the titles.

    Uses matplotlib's object API (no pyplot state, no GUI backend).

    Returns:
        A :class:`matplotlib.figure.Figure`.
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.2), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = [
        (axes[0], energy_label, energy_pred, "energy (eV/atom)"),
        (axes[1], force_label, force_pred, "force component (eV/Å)"),
    ]
    for ax, x, y, what in panels:
        x = np.asarray(x, dtype=float).ravel()
        y = np.asarray(y, dtype=float).ravel()
        if x.size:
            lo, hi = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
            pad = 0.05 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.6", lw=1)
            ax.scatter(x, y, s=6, alpha=0.6)
            rmse = float(np.sqrt(np.mean((y - x) ** 2)))
            ax.set_title(f"{what}: RMSE {rmse:.4g}")
        ax.set_xlabel(f"label {what}")
        ax.set_ylabel(f"predicted {what}")
    if title:
        fig.suptitle(title)
    return fig


class ParityPlots(L.Callback):
    """Parity plots of the validation set with the final weights, at the end of fit.

    Saves ``<run dir>/parity_val.png`` and, with W&B, logs it as the image ``parity/val``.

    Args:
        max_batches: use at most this many validation batches (``None``: all).
        filename: name of the PNG in the run folder.
    """

    def __init__(self, max_batches: int | None = None, filename: str = "parity_val.png") -> None:
        self.max_batches = max_batches
        self.filename = filename

    @torch.no_grad()
    def collect(
        self, pl_module: L.LightningModule, loader: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Predict on ``loader``; returns per-atom energies and force components (pred, label)."""
        model = pl_module.model
        was_training = model.training
        model.eval()
        e_p, e_l, f_p, f_l = [], [], [], []
        try:
            for i, batch in enumerate(loader):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                with torch.enable_grad():
                    preds = model(batch, forces=True)
                n = batch[K.N_ATOMS].to(torch.float64)
                e_p.append((preds[K.ENERGY].detach().double() / n).cpu().numpy())
                e_l.append((batch[K.ENERGY].double() / n).cpu().numpy())
                f_p.append(preds[K.FORCES].detach().double().cpu().numpy().ravel())
                f_l.append(batch[K.FORCES].double().cpu().numpy().ravel())
        finally:
            model.train(was_training)
        if not e_p:
            empty = np.zeros(0)
            return empty, empty, empty, empty
        return tuple(np.concatenate(a) for a in (e_p, e_l, f_p, f_l))  # type: ignore[return-value]

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        loader = dm.val_dataloader() if dm is not None else trainer.val_dataloaders
        if loader is None or getattr(trainer, "fast_dev_run", False):
            return
        e_p, e_l, f_p, f_l = self.collect(pl_module, loader)
        if not e_p.size:
            return
        title = f"validation, epoch {trainer.current_epoch}"
        fig = parity_figure(e_p, e_l, f_p, f_l, title=title)
        path = Path(trainer.default_root_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        log.info("parity plots written to %s", path)
        for lg in _wandb_loggers(trainer):
            lg.log_image(key="parity/val", images=[str(path)], caption=[title])
