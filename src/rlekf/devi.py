"""``rlekf-devi``: model deviation of a trajectory, DeePMD-kit's ``model_devi.out``.

Two sources of deviation:

* one RLEKF checkpoint: its Kalman uncertainty (:mod:`rlekf.uncertainty`, calibrated by the
  checkpoint's sidecar when there is one);
* several checkpoints (a committee): the spread of their predictions.

Columns, as DeePMD-kit defines them (``N`` atoms; committee statistics are population
standard deviations over the models):

* ``max_devi_v min_devi_v avg_devi_v``: over the 9 virial components ``αβ`` of
  ``σ(Ξ_αβ) / N`` (eV/atom), ``avg`` = ``sqrt(Σ_αβ σ²) / 3`` (the root mean square);
* ``max_devi_f min_devi_f avg_devi_f``: over the atoms of ``|σ(F_a)|``, the norm of the
  per-component standard deviations of atom ``a``'s force (eV/Å);
* ``devi_e``: ``σ(E / N)`` (eV/atom).

For the Kalman source these are ``σ_V / N``, ``sqrt(tr Σ_a)`` and ``σ_E / N``. Selection
with trust levels (DP-GEN): frames with ``max_devi_f`` in ``[lo, hi)`` are candidates.

    rlekf-devi traj.extxyz -m model.ckpt [-o model_devi.out] [--plot devi.png]
    rlekf-devi traj.extxyz -m a.ckpt -m b.ckpt -m c.ckpt -m d.ckpt
    rlekf-devi -m model.ckpt --calibrate val.extxyz      # writes model.ckpt.uncertainty.json
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlekf import keys as K
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.data.readers import DataError, Frame

__all__ = ["COLUMNS", "committee_deviation", "kalman_deviation", "main", "write_model_devi"]

#: Columns of ``model_devi.out`` after ``step``.
COLUMNS = (
    "max_devi_v",
    "min_devi_v",
    "avg_devi_v",
    "max_devi_f",
    "min_devi_f",
    "avg_devi_f",
    "devi_e",
)


@dataclass
class _Model:
    module: Any
    type_map: list[str]
    rcut: float
    sel: list[int]
    dtype: torch.dtype
    path: Path


def _load_model(path: Path, trust: bool) -> _Model:
    from rlekf.export import load_checkpoint, load_exported
    from rlekf.models.deep_potential import resolve_dtype

    if path.suffix == ".pt":
        module, meta = load_exported(path)
        return _Model(
            module, meta["type_map"], meta["rcut"], meta["sel"], resolve_dtype(meta["dtype"]), path
        )
    model, cfg = load_checkpoint(path, trust_checkpoint=trust)
    return _Model(model, cfg["type_map"], cfg["rcut"], cfg["sel"], model.dtype, path)


def read_trajectory(path: str | Path, fmt: str = "auto") -> list[Frame]:
    """Unlabelled frames of a trajectory: extxyz / ASE trajectory / any ASE format, or a DeePMD
    system directory (``deepmd/npy``, ``deepmd/raw``).

    Raises:
        DataError: missing, unreadable or empty.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"trajectory {path} not found")
    frames: list[Frame] = []
    try:
        if path.is_dir() or fmt.startswith("deepmd"):
            import dpdata

            dfmt = fmt if fmt.startswith("deepmd") else "deepmd/npy"
            if dfmt == "deepmd/npy" and not any(path.glob("set.*")):
                dfmt = "deepmd/raw"
            system = dpdata.System(str(path), fmt=dfmt)
            names = system["atom_names"]
            numbers = _numbers([names[t] for t in system["atom_types"]])
            nopbc = bool(system.nopbc) if hasattr(system, "nopbc") else False
            for i in range(system.get_nframes()):
                frames.append(
                    _frame(system["coords"][i], system["cells"][i], not nopbc, numbers, path, i)
                )
        else:
            from ase.io import read

            images = read(str(path), index=":", format=None if fmt == "auto" else fmt)
            for i, atoms in enumerate(images):
                frames.append(
                    _frame(
                        atoms.get_positions(),
                        np.asarray(atoms.get_cell()),
                        atoms.get_pbc(),
                        atoms.get_atomic_numbers(),
                        path,
                        i,
                    )
                )
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - ASE/dpdata raise many kinds for a bad file
        raise DataError(f"cannot read trajectory {path} ({type(exc).__name__}: {exc})") from exc
    if not frames:
        raise DataError(f"trajectory {path} holds no frames")
    return frames


def _numbers(symbols: Sequence[str]) -> np.ndarray:
    from ase.data import atomic_numbers

    try:
        return np.array([atomic_numbers[s] for s in symbols], dtype=np.int64)
    except KeyError as exc:
        raise DataError(f"unknown element symbol {exc}") from exc


def _frame(pos, cell, pbc, numbers, path: Path, index: int) -> Frame:
    pos = np.asarray(pos, dtype=np.float64)
    if not np.all(np.isfinite(pos)):
        raise DataError(f"{path} frame {index}: non-finite positions")
    return Frame(
        positions=pos,
        cell=np.asarray(cell, dtype=np.float64),
        pbc=np.asarray(pbc, dtype=bool),
        numbers=np.asarray(numbers, dtype=np.int64),
        energy=0.0,
        forces=np.zeros_like(pos),
        source=str(path),
        index=index,
    )


def _batch(frame: Frame, m: _Model) -> dict[str, torch.Tensor]:
    return collate_atoms([frame_to_item(frame, m.type_map, m.rcut, m.sel, 0, m.dtype)])


def committee_deviation(models: Sequence[Any], frames: Sequence[Frame]) -> np.ndarray:
    """The 7 DeePMD-kit deviation columns of every frame from a committee's predictions.

    Returns:
        ``(n_frames, 7)`` float64, columns :data:`COLUMNS`.
    """
    rows = []
    for frame in frames:
        n = len(frame.numbers)
        es, fs, vs = [], [], []
        for m in models:
            out = m.module(_batch(frame, m), forces=True, virial=True)
            es.append(float(out[K.ENERGY].detach()[0]) / n)
            fs.append(out[K.FORCES].detach().double().cpu().numpy())
            vs.append(out[K.VIRIAL].detach().double().cpu().numpy().reshape(9) / n)
        sf = np.linalg.norm(np.std(np.stack(fs), axis=0), axis=-1)  # (n,)
        sv = np.std(np.stack(vs), axis=0)  # (9,)
        rows.append(_row(sv, sf, float(np.std(es))))
    return np.array(rows, dtype=np.float64)


def kalman_deviation(uncertainty: Any, model: _Model, frames: Sequence[Frame]) -> np.ndarray:
    """The 7 deviation columns of every frame from a :class:`~rlekf.uncertainty.KalmanUncertainty`.

    Returns:
        ``(n_frames, 7)`` float64, columns :data:`COLUMNS`.
    """
    rows = []
    for frame in frames:
        n = len(frame.numbers)
        res = uncertainty(_batch(frame, model), forces=True, virial=True)
        sv = res["virial_std"].reshape(-1)[:9] / n
        rows.append(_row(sv, res["forces_std"], float(res["energy_std"][0]) / n))
    return np.array(rows, dtype=np.float64)


def _row(sv: np.ndarray, sf: np.ndarray, se: float) -> list[float]:
    return [
        float(sv.max()),
        float(sv.min()),
        float(np.linalg.norm(sv) / 3.0),
        float(sf.max()),
        float(sf.min()),
        float(sf.mean()),
        se,
    ]


def write_model_devi(path: str | Path, steps: np.ndarray, devi: np.ndarray, header: str) -> None:
    """Write ``model_devi.out``: ``step`` then :data:`COLUMNS`, DeePMD-kit's layout."""
    head = f"{header}\n{'step':>10s}" + "".join(f"{c:>19s}" for c in COLUMNS)
    table = np.column_stack([np.asarray(steps, dtype=np.float64), devi])
    np.savetxt(path, table, fmt=["%12d"] + ["%19.6e"] * 7, delimiter="", header=head)


def plot_deviation(
    path: str | Path,
    steps: np.ndarray,
    devi: np.ndarray,
    title: str,
    trust: tuple[float, float] | None = None,
) -> None:
    """PNG of ``max/avg_devi_f`` and ``devi_e`` against step (trust levels as lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_e) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax_f.plot(steps, devi[:, 3], label="max_devi_f")
    ax_f.plot(steps, devi[:, 5], label="avg_devi_f")
    if trust is not None:
        for level in trust:
            ax_f.axhline(level, color="k", ls="--", lw=0.8)
    ax_f.set_ylabel("force deviation (eV/Å)")
    ax_f.legend()
    ax_e.plot(steps, devi[:, 6], color="C2", label="devi_e")
    ax_e.set_ylabel("energy deviation (eV/atom)")
    ax_e.set_xlabel("step")
    ax_e.legend()
    ax_f.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _calibrate(model_path: Path, data: str, estimator: str, trust: bool) -> str:
    from rlekf.data.readers import read_frames
    from rlekf.export import load_checkpoint
    from rlekf.uncertainty import calibrate_checkpoint, calibration_path

    model, cfg = load_checkpoint(model_path, trust_checkpoint=trust)
    frames = read_frames(data)
    batches = [
        collate_atoms([frame_to_item(f, cfg["type_map"], cfg["rcut"], cfg["sel"], i, model.dtype)])
        for i, f in enumerate(frames)
    ]
    meta = calibrate_checkpoint(
        model_path,
        batches,
        model=model,
        force_estimator=estimator,
        source=str(data),
        trust_checkpoint=trust,
    )
    return (
        f"calibrated {model_path.name} on {meta['n_frames']} frames of {data}: energy scale "
        f"{meta['energy_scale']:.4g}, force scale {meta['force_scale']:.4g} "
        f"(RMSE {meta['energy_rmse_per_atom']:.4g} eV/atom, "
        f"{meta['force_rmse_per_atom']:.4g} eV/Å per atom) -> {calibration_path(model_path)}"
    )


def main(argv: list[str] | None = None) -> int:
    """``rlekf-devi TRAJ -m CKPT [-m CKPT ...]``: write ``model_devi.out`` and a PNG.

    Returns:
        The exit status: 0 on success, 1 (message on stderr) for unusable input (missing or
        unreadable trajectory or checkpoint, no covariance in a single checkpoint, elements
        outside the type map, committee type maps that differ); 2 for bad arguments.
    """
    from rlekf.uncertainty import ESTIMATORS, KalmanUncertainty, UncalibratedWarning

    parser = argparse.ArgumentParser(
        prog="rlekf-devi",
        description="Model deviation of a trajectory (DeePMD-kit's model_devi.out columns): the "
        "Kalman uncertainty of one RLEKF checkpoint, or the spread of a committee of several.",
    )
    parser.add_argument(
        "trajectory", nargs="?", help="extxyz / ASE .traj / any ASE format, or a DeePMD system"
    )
    parser.add_argument(
        "-m", "--model", action="append", required=True, help=".ckpt (repeat for a committee)"
    )
    parser.add_argument("-o", "--output", default="model_devi.out")
    parser.add_argument("--plot", default=None, help="PNG (default: OUTPUT with .png)")
    parser.add_argument("--format", default="auto", help="trajectory format (ASE name/deepmd)")
    parser.add_argument("-f", "--frequency", type=int, default=1, help="MD steps per frame")
    parser.add_argument("--force-estimator", choices=ESTIMATORS, default=None)
    parser.add_argument(
        "--calibrate",
        metavar="VAL_DATA",
        default=None,
        help="labelled held-out frames: fit the Kalman scale factors, write the sidecar",
    )
    parser.add_argument("--trust-lo", type=float, default=None, help="trust level (eV/Å)")
    parser.add_argument("--trust-hi", type=float, default=None, help="trust level (eV/Å)")
    parser.add_argument("--trust-checkpoint", action="store_true")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.model]
    if args.calibrate is None and args.trajectory is None:
        parser.error("give a trajectory (or --calibrate VAL_DATA)")
    if args.calibrate is not None and len(paths) != 1:
        parser.error("--calibrate takes exactly one checkpoint")
    if args.frequency < 1:
        parser.error("--frequency must be >= 1")
    try:
        if args.calibrate is not None:
            if paths[0].suffix == ".pt":
                raise ValueError(f"{paths[0]}: an exported model holds no covariance P")
            print(
                _calibrate(
                    paths[0],
                    args.calibrate,
                    args.force_estimator or "exact",
                    args.trust_checkpoint,
                )
            )
            if args.trajectory is None:
                return 0
        frames = read_trajectory(args.trajectory, args.format)
        models = [_load_model(p, args.trust_checkpoint) for p in paths]
        maps = {tuple(m.type_map) for m in models}
        if len(maps) > 1:
            raise ValueError(f"the committee's type maps differ: {sorted(maps)}")
        if len(models) == 1:
            if paths[0].suffix == ".pt":
                raise ValueError(
                    f"{paths[0]}: an exported model holds no covariance P; give its .ckpt or a "
                    "committee of several models"
                )
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UncalibratedWarning)
                unc = KalmanUncertainty.from_checkpoint(
                    paths[0],
                    models[0].module,
                    force_estimator=args.force_estimator,
                    trust_checkpoint=args.trust_checkpoint,
                )
            for w in caught:
                print(f"rlekf-devi: warning: {w.message}", file=sys.stderr)
            devi = kalman_deviation(unc, models[0], frames)
            kind = f"Kalman uncertainty ({unc.force_estimator} forces" + (
                ", calibrated)" if unc.calibrated else ", UNCALIBRATED: raw P scale)"
            )
        else:
            devi = committee_deviation(models, frames)
            kind = f"committee of {len(models)}"
    except (OSError, ValueError) as exc:  # DataError, NoCovarianceError are ValueErrors
        print(f"rlekf-devi: error: {exc}", file=sys.stderr)
        return 1
    steps = np.arange(len(frames)) * args.frequency
    header = f"rlekf-devi {args.trajectory}: {kind}: " + " ".join(str(p) for p in paths)
    write_model_devi(args.output, steps, devi, header)
    png = args.plot or str(Path(args.output).with_suffix(".png"))
    trust = None
    if args.trust_lo is not None and args.trust_hi is not None:
        trust = (args.trust_lo, args.trust_hi)
    plot_deviation(png, steps, devi, kind, trust)
    print(f"{len(frames)} frames, {kind}: {args.output}, {png}")
    if trust is not None:
        f = devi[:, 3]
        acc, cand = int((f < trust[0]).sum()), int(((f >= trust[0]) & (f < trust[1])).sum())
        print(f"max_devi_f: {acc} accurate, {cand} candidates, {len(f) - acc - cand} failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
