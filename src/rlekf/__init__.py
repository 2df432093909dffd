"""rlekf: train Deep Potential force fields with RLEKF and Adam."""

__version__ = "0.1.0"
