"""DeePMD-kit / LAMMPS checks (``make test-interop``): collected only where deepmd-kit imports.

``make test-interop`` runs them in ``.venv-interop`` (deepmd-kit[torch,lmp]==3.2.0 with its own
torch); in the project venv, which has no deepmd-kit, this folder is not collected.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if importlib.util.find_spec("deepmd") is None:
    collect_ignore_glob = ["test_*.py"]

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of a console script of this venv (dp, lmp, rlekf-export, ...)."""
    path = BIN / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found beside {sys.executable}")
    return found


def run(args: list, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command, fail with its output when it exits non-zero."""
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc
