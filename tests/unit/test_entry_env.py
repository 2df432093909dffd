"""Environment defaults that the entry points set before any computation."""

from __future__ import annotations

import os

from rlekf.utils.instantiate import reproducible_blas_by_default, wandb_offline_by_default


def test_mkl_strict_reproducible_mode_is_the_default_and_can_be_overridden(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    reproducible_blas_by_default()
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # a user's choice is kept
    reproducible_blas_by_default()
    assert os.environ["MKL_CBWR"] == "AUTO"


def test_wandb_is_offline_unless_told(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb_offline_by_default()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    wandb_offline_by_default()
    assert os.environ["WANDB_MODE"] == "online"
