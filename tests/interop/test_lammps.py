"""A potential trained here runs in LAMMPS (``pair_style deepmd``) as it runs in ``rlekf-md``.

The model: ``rlekf-train model=small data.sel=auto:1.5 trainer.max_epochs=2`` on the embedded
EMT Cu set (two RLEKF epochs; ``RLEKF_INTEROP_CKPT=path.ckpt`` uses a given checkpoint
instead). The margin is 1.5, not DeePMD-kit's default 1.1: the training frames have at most 83
neighbours within 6 Å (``auto`` gives sel 92), but fcc Cu has a shell at 6.25 Å and NVE runs
with a briefly trained model reached 93 (sel 92) and 102 (sel 100) neighbours, which our
calculator refuses (LAMMPS silently drops the farthest neighbours instead).
It is exported (``rlekf-export --format deepmd``), converted (``dp convert-backend model.dp
model.pth``) and run for 1,000 NVE steps of 1 fs on 108-atom fcc Cu in LAMMPS, from the same
positions and Maxwell-Boltzmann velocities (300 K, seed 0) as :func:`rlekf.md.run_nve` (the
run behind ``rlekf-md``) with our ASE calculator.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest

from rlekf.md import cu_supercell, run_nve
from tests.interop.conftest import run, tool

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "logs" / "interop" / "lammps.json"
STEPS = 1000


@pytest.fixture(scope="module")
def cu_checkpoint(tmp_path_factory) -> Path:
    given = os.environ.get("RLEKF_INTEROP_CKPT")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("train")
    run(
        [
            tool("rlekf-train"),
            "model=small",
            "data.sel=auto:1.5",
            "trainer.max_epochs=2",
            "logger=none",
            "test=false",
            f"paths.output_dir={out}",
        ],
        ROOT,
        timeout=1800,
    )
    return out / "checkpoints" / "last.ckpt"


def _initial_state(seed: int = 0, temperature_K: float = 300.0):
    """108-atom Cu with the velocities run_nve would draw (then kept with temperature_K=0)."""
    from ase.md import velocitydistribution as vd

    atoms = cu_supercell(3)
    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=temperature_K, rng=np.random.default_rng(seed))
    vd.Stationary(atoms)
    return atoms


def _write_lammps_data(atoms, path: Path) -> None:
    """Orthorhombic cell, atom_style atomic, velocities in Å/ps (metal units)."""
    from ase import units

    cell = atoms.cell.array
    assert np.allclose(cell, np.diag(np.diag(cell))), "orthorhombic cells only"
    vel = atoms.get_velocities() * units.fs * 1000.0  # ASE velocity unit -> Å/ps
    lines = ["LAMMPS data file (rlekf interop test)", "", f"{len(atoms)} atoms", "1 atom types"]
    for k, ax in enumerate("xyz"):
        lines.append(f"0.0 {cell[k, k]:.17g} {ax}lo {ax}hi")
    lines += ["", "Masses", "", f"1 {atoms.get_masses()[0]:.17g}", "", "Atoms # atomic", ""]
    lines += [
        f"{i + 1} 1 {x:.17g} {y:.17g} {z:.17g}" for i, (x, y, z) in enumerate(atoms.positions)
    ]
    lines += ["", "Velocities", ""]
    lines += [f"{i + 1} {x:.17g} {y:.17g} {z:.17g}" for i, (x, y, z) in enumerate(vel)]
    path.write_text("\n".join(lines) + "\n")


LAMMPS_INPUT = """units metal
atom_style atomic
boundary p p p
read_data conf.lmp
pair_style deepmd model.pth
pair_coeff * * Cu
neighbor 2.0 bin
neigh_modify every 1 delay 0 check yes
timestep 0.001
thermo_style custom step pe ke etotal temp
thermo_modify format float %.12f
thermo 10
fix nve all nve
run {steps}
"""


def _thermo(log: str) -> np.ndarray:
    """(T, 5) step, pe, ke, etotal, temp from a LAMMPS log."""
    block = log.split("Step", 1)[1].split("Loop time", 1)[0]
    rows = [line.split() for line in block.splitlines()[1:]]
    rows = [r for r in rows if len(r) == 5 and re.fullmatch(r"\d+", r[0])]
    return np.array(rows, dtype=np.float64)


def test_lammps_nve_starts_at_our_energy_and_conserves_it(cu_checkpoint, tmp_path, monkeypatch):
    from rlekf.calculator import DPCalculator

    work = tmp_path
    run([tool("rlekf-export"), cu_checkpoint, "--format", "deepmd", "-o", work / "model.dp"], work)
    run([tool("dp"), "convert-backend", work / "model.dp", work / "model.pth"], work)
    start = _initial_state()
    _write_lammps_data(start, work / "conf.lmp")
    (work / "in.lammps").write_text(LAMMPS_INPUT.format(steps=STEPS))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    proc = run([tool("lmp"), "-in", "in.lammps", "-log", "log.lammps"], work, timeout=1800)
    lmp = _thermo(proc.stdout)
    assert lmp[-1, 0] == STEPS and len(lmp) == STEPS // 10 + 1

    atoms = start.copy()
    atoms.set_velocities(start.get_velocities())
    calc = DPCalculator.from_checkpoint(cu_checkpoint)
    ase = run_nve(atoms, calc, steps=STEPS, timestep_fs=1.0, temperature_K=0.0, interval=10)

    n = len(start)
    e0_ours = ase.epot[0]
    lmp_etot = lmp[:, 3] / n
    lmp_dev = float(np.max(np.abs(lmp_etot - lmp_etot[0])))
    lmp_drift = float(np.polyfit(lmp[:, 0] * 1e-3, lmp_etot, 1)[0])
    n_same = min(len(ase.epot), len(lmp))
    summary = {
        "checkpoint": str(cu_checkpoint),
        "atoms": n,
        "steps": STEPS,
        "timestep_fs": 1.0,
        "epot0_ase_eV": float(e0_ours),
        "epot0_lammps_eV": float(lmp[0, 1]),
        "epot0_relative_difference": float(abs(lmp[0, 1] - e0_ours) / abs(e0_ours)),
        "ekin0_relative_difference": float(abs(lmp[0, 2] - ase.ekin[0]) / ase.ekin[0]),
        "lammps_max_dev_eV_per_atom": lmp_dev,
        "lammps_drift_eV_per_atom_ps": lmp_drift,
        "rlekf_md_max_dev_eV_per_atom": ase.max_deviation,
        "rlekf_md_drift_eV_per_atom_ps": ase.drift,
        "epot_max_abs_difference_along_run_eV_per_atom": float(
            np.max(np.abs(lmp[:n_same, 1] - ase.epot[:n_same])) / n
        ),
        "temperature_K_start_end_lammps": [float(lmp[0, 4]), float(lmp[-1, 4])],
        "temperature_K_start_end_ase": [float(ase.temperature[0]), float(ase.temperature[-1])],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    # the same model, structure and velocities: the same starting energy
    assert summary["epot0_relative_difference"] <= 1e-8
    # kinetic energies differ only by the two codes' unit constants
    assert summary["ekin0_relative_difference"] <= 1e-6
    # LAMMPS conserves energy as well as rlekf-md (velocity Verlet in both)
    assert lmp_dev <= max(2.0 * ase.max_deviation, 1e-5)
    assert abs(lmp_drift) <= max(2.0 * abs(ase.drift), 1e-4)
