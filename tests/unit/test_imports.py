"""Imports run one way: models and optim load neither Lightning nor the data package."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def _modules_after(statement: str) -> list[str]:
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    res = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def _forbidden(modules: list[str]) -> list[str]:
    roots = ("lightning", "pytorch_lightning", "hydra", "omegaconf", "rlekf.data")
    return [m for m in modules if any(m == r or m.startswith(r + ".") for r in roots)]


@pytest.mark.parametrize("package", ["rlekf.models", "rlekf.optim", "rlekf.keys"])
def test_core_packages_load_no_lightning_and_no_data(package):
    loaded = _modules_after(f"import {package}")
    assert package in loaded
    assert _forbidden(loaded) == []


def test_keys_import_nothing_of_rlekf():
    loaded = _modules_after("import rlekf.keys")
    assert [m for m in loaded if m.startswith("rlekf")] == ["rlekf", "rlekf.keys"]
    assert "torch" not in loaded


def test_old_import_paths_still_work():
    import rlekf.keys
    from rlekf.data import io as data_io
    from rlekf.data import keys as data_keys
    from rlekf.utils import io

    for name in rlekf.keys.__all__:
        assert getattr(data_keys, name) == getattr(rlekf.keys, name)
    assert rlekf.keys.ATOM_ENERGY == "atom_energy" and rlekf.keys.MAX_COUNT == "_max_count"
    assert data_io.atomic_write is io.atomic_write
    assert data_io.atomic_write_bytes is io.atomic_write_bytes
