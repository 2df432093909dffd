"""Shared fixtures: location of ../shared/data and Hydra config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"


def shared_data_dir() -> Path | None:
    env = os.environ.get("RLEKF_SHARED_DATA")
    path = Path(env) if env else ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """One folder for the generated data sets (EMT Cu) of the whole session (cached by hash)."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip(
            "real DFT data not found at ../shared/data (set RLEKF_SHARED_DATA); "
            "this test needs the shared data sets beside the clone"
        )
    return path


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
