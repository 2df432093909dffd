"""Embedded default data set: bulk fcc Cu labelled with ASE's EMT potential (no download).

:func:`generate_cu_emt` runs short seeded Langevin MD of a strained fcc Cu supercell with
:class:`ase.calculators.emt.EMT` at several temperatures and strains and records energies (eV),
forces (eV/Å) and virials (eV). :func:`ensure_cu_emt` caches the frames as extxyz with a JSON
sidecar (parameters + sha256), written atomically, and :func:`load_cu_emt` reads them back with
:func:`rlekf.data.readers.read_frames`.

EMT is a cheap toy potential, not DFT: use this set for smoke tests, examples and optimizer
comparisons, not for physics.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlekf.data.io import atomic_write_bytes
from rlekf.data.readers import DataWarning, Frame, read_frames

__all__ = [
    "GENERATOR_VERSION",
    "cache_name",
    "ensure_cu_emt",
    "frame_conditions",
    "generate_cu_emt",
    "load_cu_emt",
    "normalize_params",
]

#: Bump when the generation algorithm changes so old caches are not reused.
GENERATOR_VERSION: int = 2

_TIMESTEP_FS = 5.0  # MD time step (fs)
_FRICTION_PER_FS = 0.02  # Langevin friction (1/fs)
_SAMPLE_INTERVAL = 10  # MD steps between recorded frames (50 fs)
_EQUILIBRATION_STEPS = 20  # MD steps before the first recorded frame of each block


def _frames_per_block(n_frames: int, n_blocks: int) -> list[int]:
    """Frames of each block: ``n_frames`` spread evenly, the first blocks one more."""
    n_base, n_extra = divmod(n_frames, n_blocks)
    return [n_base + (b < n_extra) for b in range(n_blocks)]


def frame_conditions(
    n_frames: int = 240,
    temperatures: Sequence[float] = (300.0, 600.0, 900.0, 1200.0),
    strains: Sequence[float] = (-0.02, 0.0, 0.02),
) -> list[tuple[float, float]]:
    """``(temperature K, strain)`` of every frame :func:`generate_cu_emt` records, in order.

    Frames come in ``len(temperatures) * len(strains)`` consecutive blocks ordered by
    (temperature, strain), so the temperatures occupy ``len(temperatures)`` consecutive,
    nearly equal parts of the file (what ``AtomsDataModule(strata=...)`` stratifies on).
    """
    blocks = [(float(t), float(s)) for t in temperatures for s in strains]
    per_block = _frames_per_block(n_frames, len(blocks))
    return [c for c, k in zip(blocks, per_block, strict=True) for _ in range(k)]


def generate_cu_emt(
    n_frames: int = 240,
    size: int = 3,
    seed: int = 0,
    temperatures: Sequence[float] = (300.0, 600.0, 900.0, 1200.0),
    strains: Sequence[float] = (-0.02, 0.0, 0.02),
    a: float = 3.61,
    random_strain: float = 0.005,
) -> list[Frame]:
    """Generate EMT-labelled bulk fcc Cu frames from short seeded Langevin MD.

    The frames are split into ``len(temperatures) * len(strains)`` blocks, ordered by
    (temperature, strain), so a contiguous-block split separates thermodynamic conditions.
    Each block starts from the ideal ``size**3`` conventional supercell (``4 * size**3`` atoms)
    deformed by ``(1 + strain) * I + E``, where ``E`` is a random symmetric strain with entries
    of standard deviation ``random_strain``; velocities are drawn at twice the target
    temperature, followed by ``20`` equilibration steps of Langevin dynamics (5 fs step,
    friction 0.02/fs), and then a frame is recorded every ``10`` steps (50 fs).

    All randomness comes from ``np.random.SeedSequence(seed)``, so the result is deterministic
    for a given seed (on a given platform and ASE version). The MD is ASE's own
    :class:`ase.md.langevin.Langevin` driving :class:`ase.calculators.emt.EMT`; the defaults
    take about 30 s on one CPU core, once (the result is cached by :func:`ensure_cu_emt`).
    Recorded positions are wrapped into the cell.

    Args:
        n_frames: Total number of frames, spread as evenly as possible over the blocks (the
            first blocks get one more when it does not divide).
        size: Supercell repetitions of the 4-atom conventional cell (3 -> 108 atoms).
        seed: Random seed.
        temperatures: MD temperatures in K.
        strains: Isotropic linear strains (e.g. -0.02 = 2 % compression).
        a: Cubic lattice constant in Å.
        random_strain: Standard deviation of the extra random symmetric strain per block.

    Returns:
        ``n_frames`` frames with energy (eV), forces (n, 3) eV/Å and virial (3, 3) eV; their
        ``source`` is ``"<generated cu_emt seed=SEED>"`` and ``index`` runs over all frames.

    Raises:
        ValueError: If an argument is out of range.
    """
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.geometry import wrap_positions
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary

    try:  # ase >= 3.29
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # pragma: no cover - older ase
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    temperatures = [float(t) for t in temperatures]
    strains = [float(s) for s in strains]
    if n_frames < 1 or size < 1 or not temperatures or not strains:
        raise ValueError(
            "generate_cu_emt needs n_frames >= 1, size >= 1 and non-empty temperatures/strains"
        )
    if min(temperatures) <= 0.0 or a <= 0.0 or random_strain < 0.0:
        raise ValueError("temperatures and a must be > 0 and random_strain >= 0")

    blocks = [(t, s) for t in temperatures for s in strains]
    per_block = _frames_per_block(n_frames, len(blocks))
    children = np.random.SeedSequence(seed).spawn(len(blocks))
    base = bulk("Cu", "fcc", a=a, cubic=True).repeat(size)
    dt = _TIMESTEP_FS * units.fs
    friction = _FRICTION_PER_FS / units.fs
    source = f"<generated cu_emt seed={seed}>"

    frames: list[Frame] = []
    for (temp, strain), n_block, child in zip(blocks, per_block, children, strict=True):
        if n_block == 0:
            continue
        rng = np.random.default_rng(child)
        atoms = base.copy()
        noise = rng.normal(0.0, random_strain, size=(3, 3))
        deform = (1.0 + strain) * np.eye(3) + 0.5 * (noise + noise.T)
        atoms.set_cell(np.asarray(base.get_cell()) @ deform, scale_atoms=True)
        atoms.calc = EMT()
        thermalize_momenta(atoms, temperature_K=2.0 * temp, rng=rng)
        Stationary(atoms)
        dyn = Langevin(
            atoms, timestep=dt, temperature_K=temp, friction=friction, rng=rng, fixcm=False
        )
        dyn.run(_EQUILIBRATION_STEPS)
        cell = np.asarray(atoms.get_cell())
        for _ in range(n_block):
            dyn.run(_SAMPLE_INTERVAL)
            stress = atoms.get_stress(voigt=False)
            frames.append(
                Frame(
                    positions=wrap_positions(atoms.get_positions(), cell, pbc=True),
                    cell=cell.copy(),
                    pbc=np.ones(3, dtype=bool),
                    numbers=atoms.get_atomic_numbers(),
                    energy=float(atoms.get_potential_energy()),
                    forces=atoms.get_forces().copy(),
                    virial=-stress * atoms.get_volume(),
                    source=source,
                    index=len(frames),
                )
            )
    return frames


_GENERATOR_SIGNATURE = inspect.signature(generate_cu_emt)


def normalize_params(**params: Any) -> dict[str, Any]:
    """Complete ``params`` with :func:`generate_cu_emt` defaults in a JSON-stable form.

    Args:
        **params: Keyword arguments of :func:`generate_cu_emt`.

    Returns:
        All generator parameters, sorted by name, tuples as lists of floats.

    Raises:
        TypeError: For an unknown parameter name.
    """
    bound = _GENERATOR_SIGNATURE.bind(**params)
    bound.apply_defaults()
    out: dict[str, Any] = {}
    for key, value in sorted(bound.arguments.items()):
        if key in ("temperatures", "strains"):
            out[key] = [float(v) for v in value]
        elif key in ("n_frames", "size", "seed"):
            out[key] = int(value)
        else:
            out[key] = float(value)
    return out


def cache_name(**params: Any) -> str:
    """File stem ``cu_emt_<12 hex digits>`` identifying the parameters and generator version."""
    payload = {"generator_version": GENERATOR_VERSION, "params": normalize_params(**params)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return f"cu_emt_{digest[:12]}"


def ensure_cu_emt(cache_dir: str | os.PathLike, **params: Any) -> Path:
    """Return the path of the cached Cu/EMT extxyz file, generating it if needed.

    The file ``cache_dir/cu_emt_<hash>.extxyz`` has a sidecar ``cu_emt_<hash>.json`` holding
    the parameters, the generator version and the file's sha256. An existing file is reused
    when its sha256 matches the sidecar; a corrupt or mismatched cache is regenerated with a
    :class:`~rlekf.data.readers.DataWarning`. Both files are written atomically (temporary file
    in the same directory, fsync, ``os.replace``), so concurrent callers and interrupted runs
    never leave a partial file under the final name.

    Args:
        cache_dir: Directory for the cache (created if missing).
        **params: Keyword arguments of :func:`generate_cu_emt`.

    Returns:
        Path of the extxyz file.
    """
    params_n = normalize_params(**params)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stem = cache_name(**params)
    path = cache / f"{stem}.extxyz"
    meta_path = cache / f"{stem}.json"

    if path.exists():
        problem = _cache_problem(path, meta_path, params_n)
        if problem is None:
            return path
        warnings.warn(
            f"{path}: cached Cu/EMT data set is unusable ({problem}); regenerating it",
            DataWarning,
            stacklevel=2,
        )

    frames = generate_cu_emt(**params_n)
    buf = io.StringIO()
    _write_extxyz(buf, frames)
    data = buf.getvalue().encode()
    atomic_write_bytes(path, data)
    meta = {
        "generator": "rlekf.data.emt.generate_cu_emt",
        "generator_version": GENERATOR_VERSION,
        "params": params_n,
        "n_frames": len(frames),
        "sha256": hashlib.sha256(data).hexdigest(),
        "ase_version": _ase_version(),
        "units": {"energy": "eV", "forces": "eV/Angstrom", "stress": "eV/Angstrom^3"},
    }
    atomic_write_bytes(meta_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return path


def load_cu_emt(cache_dir: str | os.PathLike, **params: Any) -> list[Frame]:
    """Ensure the cache (see :func:`ensure_cu_emt`) and read it with ``read_frames``.

    Args:
        cache_dir: Cache directory.
        **params: Keyword arguments of :func:`generate_cu_emt`.

    Returns:
        The frames; their ``source`` is the cache file path.
    """
    return read_frames(ensure_cu_emt(cache_dir, **params), fmt="extxyz")


# --------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------


def _ase_version() -> str:
    import ase

    return str(ase.__version__)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cache_problem(path: Path, meta_path: Path, params: dict[str, Any]) -> str | None:
    """Return why the cache cannot be reused, or ``None`` if it can."""
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        return f"sidecar {meta_path.name} is missing"
    except (OSError, ValueError) as exc:
        return f"sidecar {meta_path.name} is unreadable: {exc}"
    if not isinstance(meta, dict):
        return f"sidecar {meta_path.name} is not a JSON object"
    if meta.get("params") != params or meta.get("generator_version") != GENERATOR_VERSION:
        return "sidecar parameters or generator version differ"
    digest = _sha256_file(path)
    if meta.get("sha256") != digest:
        return f"sha256 {digest[:12]}... does not match the sidecar (file corrupt or edited)"
    return None


def _write_extxyz(fh: io.StringIO, frames: list[Frame]) -> None:
    import ase.io

    ase.io.write(fh, [f.to_atoms() for f in frames], format="extxyz")
