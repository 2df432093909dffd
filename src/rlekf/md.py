"""NVE molecular dynamics with a trained potential (``rlekf-md``).

Velocity Verlet (:class:`ase.md.verlet.VelocityVerlet`) on bulk fcc Cu (default 3x3x3 cubic
cells = 108 atoms) from Maxwell-Boltzmann velocities at 300 K (seeded, zero total momentum).
Reports the total-energy drift per atom per ps (slope of a linear fit of E_tot(t)) and the
largest deviation of E_tot from its start, and writes the trajectory as extxyz.

Units: time in fs (input) and ps (drift), energies in eV, temperature in K.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["MDResult", "cu_supercell", "load_calculator", "main", "run_nve"]

PathLike = str | os.PathLike

TRUST_HELP = (
    "allow full unpickling of a .ckpt that weights_only loading refuses (it can run code "
    "from the file: only for files you trust; rlekf's own checkpoints never need it)"
)


@dataclass
class MDResult:
    """Energies along an NVE run (sampled every ``interval`` steps, step 0 included).

    Attributes:
        time_ps: (T,) ps.
        epot: (T,) potential energy, eV.
        ekin: (T,) kinetic energy, eV.
        temperature: (T,) K.
        n_atoms: atoms in the cell.
        drift: slope of E_tot/atom vs time, eV/atom/ps.
        max_deviation: max |E_tot − E_tot(0)| / atom, eV/atom.
    """

    time_ps: np.ndarray
    epot: np.ndarray
    ekin: np.ndarray
    temperature: np.ndarray
    n_atoms: int
    drift: float
    max_deviation: float

    @property
    def etot(self) -> np.ndarray:
        """(T,) total energy, eV."""
        return self.epot + self.ekin


def cu_supercell(size: int = 3, a: float = 3.61) -> Any:
    """Bulk fcc Cu, ``size``³ cubic cells (4·size³ atoms), lattice constant ``a`` Å."""
    from ase.build import bulk

    return bulk("Cu", "fcc", a=a, cubic=True).repeat(size)


def load_calculator(path: PathLike, device: str = "cpu", trust_checkpoint: bool = False) -> Any:
    """A :class:`~rlekf.calculator.DPCalculator` from a ``.ckpt`` checkpoint or exported file.

    Files ending in ``.ckpt`` are read as Lightning checkpoints (``weights_only``, unless
    ``trust_checkpoint``; see :func:`rlekf.export.load_checkpoint`), anything else as exported
    TorchScript.
    """
    from rlekf.calculator import DPCalculator

    path = Path(path)
    if path.suffix == ".ckpt":
        return DPCalculator.from_checkpoint(path, device=device, trust_checkpoint=trust_checkpoint)
    return DPCalculator.from_file(path, device=device)


def run_nve(
    atoms: Any,
    calc: Any,
    *,
    steps: int = 1000,
    timestep_fs: float = 1.0,
    temperature_K: float = 300.0,
    seed: int = 0,
    interval: int = 10,
    trajectory: PathLike | None = None,
    progress: bool = False,
    callback: Callable[[int, Any], None] | None = None,
) -> MDResult:
    """Run NVE velocity Verlet and measure the energy drift.

    Args:
        atoms: the structure (modified in place: positions, velocities, calculator).
        calc: an ASE calculator.
        steps: MD steps.
        timestep_fs: time step, fs.
        temperature_K: Maxwell-Boltzmann initial temperature, K (0 keeps the velocities
            ``atoms`` already has).
        seed: seeds the initial velocities.
        interval: record energies (and trajectory frames) every this many steps.
        trajectory: extxyz file to write (overwritten), or ``None``.
        progress: show a rich progress bar.
        callback: called as ``callback(step, atoms)`` at every recorded step.

    Returns:
        Energies along the run and the drift.
    """
    from ase import units
    from ase.io import write
    from ase.md import velocitydistribution as vd
    from ase.md.verlet import VelocityVerlet

    if steps < 1 or interval < 1:
        raise ValueError(f"steps and interval must be >= 1, got {steps}, {interval}")
    atoms.calc = calc
    if temperature_K > 0:
        rng = np.random.default_rng(seed)
        # ase >= 3.29 renamed MaxwellBoltzmannDistribution to thermalize_momenta
        thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
        thermalize(atoms, temperature_K=temperature_K, rng=rng)
        vd.Stationary(atoms)
    traj_path = Path(trajectory) if trajectory is not None else None
    if traj_path is not None:
        traj_path.parent.mkdir(parents=True, exist_ok=True)
        traj_path.unlink(missing_ok=True)
    dyn = VelocityVerlet(atoms, timestep=timestep_fs * units.fs)
    times, epot, ekin, temp = [], [], [], []

    def record() -> None:
        step = dyn.nsteps
        times.append(step * timestep_fs / 1000.0)
        epot.append(atoms.get_potential_energy())
        ekin.append(atoms.get_kinetic_energy())
        temp.append(atoms.get_temperature())
        if traj_path is not None:
            write(traj_path, atoms, format="extxyz", append=True)
        if callback is not None:
            callback(step, atoms)

    dyn.attach(record, interval=interval)
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("NVE"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TextColumn("T={task.fields[temp]:.0f} K"),
            TimeRemainingColumn(),
        )
        with Progress(*columns) as bar:
            task = bar.add_task("md", total=steps, temp=atoms.get_temperature())
            dyn.attach(
                lambda: bar.update(task, completed=dyn.nsteps, temp=atoms.get_temperature()),
                interval=max(1, steps // 200),
            )
            dyn.run(steps)
            bar.update(task, completed=steps)
    else:
        dyn.run(steps)
    n = len(atoms)
    t = np.asarray(times)
    e = (np.asarray(epot) + np.asarray(ekin)) / n
    drift = float(np.polyfit(t, e, 1)[0]) if len(t) > 1 else 0.0
    return MDResult(
        time_ps=t,
        epot=np.asarray(epot),
        ekin=np.asarray(ekin),
        temperature=np.asarray(temp),
        n_atoms=n,
        drift=drift,
        max_deviation=float(np.max(np.abs(e - e[0]))),
    )


def main(argv: list[str] | None = None) -> int:
    """``rlekf-md MODEL [options]``: NVE run on fcc Cu; prints the energy drift.

    Returns:
        The exit status: 0 on success, 1 (with a message on stderr) when the model cannot be
        loaded or does not fit the cell (element, neighbour count).
    """
    parser = argparse.ArgumentParser(
        prog="rlekf-md",
        description="NVE velocity-Verlet MD of fcc Cu with a trained checkpoint (.ckpt) or "
        "exported model (.pt); reports the total-energy drift.",
    )
    parser.add_argument("model", help=".ckpt from rlekf-train or .pt from rlekf-export")
    parser.add_argument("--size", type=int, default=3, help="cubic cells per edge (3 → 108)")
    parser.add_argument("--a", type=float, default=3.61, help="lattice constant, Å")
    parser.add_argument("--temperature", type=float, default=300.0, help="initial T, K")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--timestep", type=float, default=1.0, help="fs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=int, default=10, help="steps between frames")
    parser.add_argument("--traj", default="md.extxyz", help="extxyz output ('' for none)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = parser.parse_args(argv)
    try:
        calc = load_calculator(args.model, args.device, args.trust_checkpoint)
        atoms = cu_supercell(args.size, args.a)
        res = run_nve(
            atoms,
            calc,
            steps=args.steps,
            timestep_fs=args.timestep,
            temperature_K=args.temperature,
            seed=args.seed,
            interval=args.interval,
            trajectory=args.traj or None,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as exc:  # missing file, bad model, element or sel mismatch
        print(f"rlekf-md: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"NVE {args.steps} steps x {args.timestep} fs, {res.n_atoms} atoms: "
        f"T {res.temperature[0]:.0f} -> {res.temperature[-1]:.0f} K, "
        f"energy drift {res.drift:.3e} eV/atom/ps, "
        f"max |E_tot - E_tot(0)| {res.max_deviation:.3e} eV/atom"
    )
    if args.traj:
        print(f"trajectory: {args.traj}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
