"""Atomic file writes (kept for compatibility): they live in :mod:`rlekf.utils.io`."""

from rlekf.utils.io import atomic_write, atomic_write_bytes

__all__ = ["atomic_write", "atomic_write_bytes"]
