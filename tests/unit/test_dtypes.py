"""The one dtype parser shared by the model, the optimizer and the benchmarks."""

from __future__ import annotations

import pytest
import torch

from rlekf.models import DeepPotential  # noqa: F401  (the model's resolver uses it)
from rlekf.models.deep_potential import resolve_dtype
from rlekf.utils.dtypes import float_dtype, float_dtype_name


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("float64", torch.float64),
        (" Double ", torch.float64),
        ("torch.float64", torch.float64),
        ("fp32", torch.float32),
        ("float", torch.float32),
        (torch.float32, torch.float32),
    ],
)
def test_names_and_dtypes(value, expected) -> None:
    assert float_dtype(value) is expected
    assert float_dtype_name(value) == str(expected).removeprefix("torch.")
    assert resolve_dtype(value) is expected


@pytest.mark.parametrize("value", ["float16", torch.float16, torch.int64, "half", 3])
def test_other_values_are_refused_with_the_option_name(value) -> None:
    with pytest.raises(ValueError, match="Invalid p_dtype"):
        float_dtype(value, "p_dtype")
    from rlekf.optim import RLEKF

    with pytest.raises(ValueError, match="p_dtype"):
        RLEKF([torch.nn.Parameter(torch.zeros(3))], p_dtype=value)
