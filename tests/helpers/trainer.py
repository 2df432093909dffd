"""A bare Lightning Trainer for tests: CPU, one epoch, no logger, checkpoints, bars or summary."""

from __future__ import annotations


def bare_trainer(**kw):
    """``L.Trainer`` with everything optional off (``inference_mode=False``: forces need
    gradients in validation); ``kw`` overrides any argument."""
    import lightning as L

    args = dict(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        accelerator="cpu",
        num_sanity_val_steps=0,
    )
    args.update(kw)
    return L.Trainer(**args)
