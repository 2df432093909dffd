"""The one parser of floating-point dtype names (configs pass strings; no third-party imports
besides torch)."""

from __future__ import annotations

import torch

FLOAT_DTYPES = {"float64": torch.float64, "float32": torch.float32}
_ALIASES = {
    "float64": "float64",
    "double": "float64",
    "torch.float64": "float64",
    "fp64": "float64",
    "float32": "float32",
    "float": "float32",
    "torch.float32": "float32",
    "fp32": "float32",
}


def float_dtype_name(value: torch.dtype | str, what: str = "dtype") -> str:
    """``"float64"`` or ``"float32"`` for a torch dtype or a name (``"double"``, ``"fp32"``,
    ``"torch.float64"``, ...; case and spaces ignored).

    Raises:
        ValueError: Anything else, naming ``what``.
    """
    if isinstance(value, torch.dtype):
        name = str(value).removeprefix("torch.")
        if name in FLOAT_DTYPES:
            return name
    elif isinstance(value, str) and value.strip().lower() in _ALIASES:
        return _ALIASES[value.strip().lower()]
    raise ValueError(
        f"Invalid {what}: {value!r} (expected torch.float64 or torch.float32, "
        "or the strings 'float64'/'float32')"
    )


def float_dtype(value: torch.dtype | str, what: str = "dtype") -> torch.dtype:
    """The torch dtype of :func:`float_dtype_name`."""
    return FLOAT_DTYPES[float_dtype_name(value, what)]
