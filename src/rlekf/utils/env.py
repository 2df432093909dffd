"""Environment defaults that the entry points set before any computation (no third-party
imports, so entry points that do not use Hydra can call them too)."""

from __future__ import annotations

import os


def wandb_offline_by_default() -> None:
    """W&B runs offline unless ``WANDB_MODE`` says otherwise (called by the entry points)."""
    os.environ.setdefault("WANDB_MODE", "offline")


def cpu_vendor() -> str:
    """The CPU's ``vendor_id`` from ``/proc/cpuinfo`` (``"GenuineIntel"``, ``"AuthenticAMD"``;
    ``""`` where there is none, e.g. off Linux or on ARM)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def reproducible_blas_by_default(vendor: str | None = None) -> None:
    """Intel MKL runs in a reproducible mode unless ``MKL_CBWR`` says otherwise.

    Called by ``rlekf-train`` and ``rlekf-otf`` before any computation. In MKL's default mode
    the bits of a result may depend on the operands' memory alignment, so a resumed run could
    differ from an uninterrupted one in the last bit (seen on an AVX-512 Intel Xeon and on an
    AMD EPYC). On Intel CPUs ``MKL_CBWR=AUTO,STRICT`` keeps MKL's fastest code path and makes it
    independent of alignment; MKL's strict mode is for Intel CPUs, and on the AMD EPYC it did
    not suffice, so other CPUs get ``MKL_CBWR=COMPATIBLE`` (MKL's most portable code path). Set
    ``MKL_CBWR=AUTO`` to opt out.

    Args:
        vendor: the CPU vendor (default: :func:`cpu_vendor`).
    """
    vendor = cpu_vendor() if vendor is None else vendor
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT" if vendor == "GenuineIntel" else "COMPATIBLE")
