"""Environment defaults that the entry points set before any computation."""

from __future__ import annotations

import os

from rlekf.utils.env import (
    cpu_vendor,
    reproducible_blas_by_default,
    wandb_offline_by_default,
)


def test_mkl_reproducible_mode_is_the_default_and_can_be_overridden(monkeypatch):
    monkeypatch.delenv("MKL_CBWR", raising=False)
    reproducible_blas_by_default("GenuineIntel")
    assert os.environ["MKL_CBWR"] == "AUTO,STRICT"
    monkeypatch.delenv("MKL_CBWR")
    reproducible_blas_by_default("AuthenticAMD")
    assert os.environ["MKL_CBWR"] == "COMPATIBLE"
    monkeypatch.delenv("MKL_CBWR")
    reproducible_blas_by_default()  # this machine's vendor
    expected = "AUTO,STRICT" if cpu_vendor() == "GenuineIntel" else "COMPATIBLE"
    assert os.environ["MKL_CBWR"] == expected
    monkeypatch.setenv("MKL_CBWR", "AUTO")  # a user's choice is kept
    reproducible_blas_by_default("AuthenticAMD")
    assert os.environ["MKL_CBWR"] == "AUTO"


def test_cpu_vendor_reads_proc_cpuinfo():
    vendor = cpu_vendor()
    assert isinstance(vendor, str)
    if os.path.exists("/proc/cpuinfo") and "vendor_id" in open("/proc/cpuinfo").read():
        assert vendor and vendor in open("/proc/cpuinfo").read()


def test_wandb_is_offline_unless_told(monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    wandb_offline_by_default()
    assert os.environ["WANDB_MODE"] == "offline"
    monkeypatch.setenv("WANDB_MODE", "online")
    wandb_offline_by_default()
    assert os.environ["WANDB_MODE"] == "online"


def test_rlekf_otf_sets_the_mkl_default_before_it_reads_anything(monkeypatch, tmp_path, capsys):
    from rlekf import otf

    monkeypatch.delenv("MKL_CBWR", raising=False)
    status = otf.main([str(tmp_path / "missing.ckpt"), "--threshold", "1", "-o", str(tmp_path)])
    assert status == 1  # the checkpoint does not exist: a clear error, no traceback
    assert "missing.ckpt" in capsys.readouterr().err
    expected = "AUTO,STRICT" if cpu_vendor() == "GenuineIntel" else "COMPATIBLE"
    assert os.environ["MKL_CBWR"] == expected
