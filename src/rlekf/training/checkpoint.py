"""Crash-safe checkpoint files.

:class:`AtomicCheckpointIO` writes every checkpoint to a temporary file in the target folder,
flushes and ``fsync``s it, then ``os.replace``s it over the old file and ``fsync``s the folder.
A process killed at any moment (SIGKILL included) leaves either the previous complete file or
the new complete file, never a truncated one. Lightning's default writer buffers the whole
checkpoint in memory and has no fsync; with a P of several GiB both matter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from rlekf.utils.io import atomic_write

__all__ = ["AtomicCheckpointIO", "atomic_torch_save"]


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` to ``path`` atomically (temp file + fsync + rename + fsync of the folder)."""
    atomic_write(Path(path), lambda fh: torch.save(obj, fh))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint plugin writing files atomically (see module docstring)."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        atomic_torch_save(checkpoint, path)
