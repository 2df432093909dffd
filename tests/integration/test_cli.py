"""Every console script, run as a user runs it (the installed command, in a subprocess).

Exit status 0 on success, non-zero with a message on failure. ``rlekf-export`` and ``rlekf-md``
really run on a tiny model; the others, whose real runs are long, answer ``--help``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

from rlekf.models import DeepPotential

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
_SECTION = (ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
SCRIPTS = sorted(re.findall(r"^([\w-]+)\s*=", _SECTION, re.M))


def _run(name: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = BIN / name
    if not exe.exists():
        exe = shutil.which(name)
        if exe is None:
            pytest.skip(f"{name} is not installed (run `make install`)")
    return subprocess.run(
        [str(exe), *args], capture_output=True, text=True, timeout=300, cwd=cwd or ROOT
    )


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A checkpoint as rlekf-train stores the model (weights + model_config), 4-atom Cu ready."""
    model = DeepPotential(["Cu"], sel=[100], embedding=[4, 8], fitting=[8], axis_neuron=2, seed=0)
    model.set_statistics(
        {"env_avg": [[0.1, 0, 0, 0]], "env_std": [[0.3, 0.2, 0.2, 0.2]], "energy_bias": [-3.5]}
    )
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path_factory.mktemp("cli") / "tiny.ckpt"
    torch.save({"state_dict": state, "model_config": dict(model.config)}, path)
    return path


def test_every_console_script_is_covered():
    expected = [
        "rlekf-bench",
        "rlekf-bench-dist",
        "rlekf-change-bias",
        "rlekf-devi",
        "rlekf-eval",
        "rlekf-export",
        "rlekf-md",
        "rlekf-otf",
        "rlekf-report",
        "rlekf-train",
    ]
    assert SCRIPTS == expected


# Hydra apps parse sys.argv themselves: their --help runs as the installed command (all
# three at once); the argparse scripts take argv, so their --help runs in this process
# through the console-script entry point (the installed command's target).
HYDRA_SCRIPTS = ["rlekf-change-bias", "rlekf-eval", "rlekf-train"]


def test_hydra_scripts_help_exits_zero():
    procs = {}
    for name in HYDRA_SCRIPTS:
        exe = BIN / name
        if not exe.exists():
            pytest.skip(f"{name} is not installed (run `make install`)")
        procs[name] = subprocess.Popen(
            [str(exe), "--help"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, err[-2000:])
        assert out.strip(), name


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s not in HYDRA_SCRIPTS])
def test_argparse_scripts_help_exits_zero(name, capsys):
    (ep,) = entry_points(group="console_scripts", name=name)
    main = ep.load()
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip()


def test_export_then_md_exit_zero(tiny_ckpt, tmp_path):
    out = tmp_path / "tiny.pt"
    res = _run("rlekf-export", str(tiny_ckpt), "-o", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    assert out.is_file() and "exported" in res.stdout
    md = ["--size", "1", "--steps", "4", "--interval", "2", "--no-progress", "--traj", ""]
    res = _run("rlekf-md", str(out), *md)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "energy drift" in res.stdout
    assert "MDResult" not in res.stdout + res.stderr  # no repr of the result


def test_failures_exit_nonzero_with_a_message(tiny_ckpt, tmp_path):
    missing = tmp_path / "missing.ckpt"
    for name, args in (
        ("rlekf-export", [str(missing)]),
        ("rlekf-md", [str(missing), "--steps", "1", "--no-progress", "--traj", ""]),
    ):
        res = _run(name, *args)
        assert res.returncode != 0
        assert f"{name}: error:" in res.stderr and "not found" in res.stderr
        assert "Traceback" not in res.stderr
    res = _run("rlekf-eval", f"ckpt_path={missing}", "hydra.run.dir=" + str(tmp_path / "ev"))
    assert res.returncode != 0 and "not found" in res.stderr
