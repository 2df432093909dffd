"""Batch keys (kept for compatibility): the constants live in :mod:`rlekf.keys`."""

from rlekf.keys import *  # noqa: F403
from rlekf.keys import __all__  # noqa: F401
