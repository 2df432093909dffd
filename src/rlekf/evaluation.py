"""Evaluate a trained potential on labelled frames: predictions, errors, CSV and parity plot.

Library code behind ``rlekf-eval`` (no Hydra). Units: energies per atom in eV/atom, forces in
eV/Å, virials per atom in eV/atom (``W / n``, DeePMD convention ``W = -stress * volume``) and
stresses in GPa (``-W / volume``). Errors are prediction minus DFT label. Virial and stress
errors are reported when some evaluated frames carry virial labels (over those frames only, all
9 components of the 3x3 tensor, like ``val/virial_rmse``).

Files written by :func:`write_outputs`:

* ``predictions_frames.csv``: one row per frame: ``frame_id, source, index, n_atoms, formula,
  energy_dft, energy_pred`` (eV) and ``energy_per_atom_dft, energy_per_atom_pred`` (eV/atom);
* ``predictions_atoms.csv``: one row per atom: ``frame_id, atom, element, fx_dft, fy_dft,
  fz_dft, fx_pred, fy_pred, fz_pred`` (eV/Å);
* ``metrics.json``: the numbers of :func:`compute_metrics`;
* ``metrics_by_group.json`` (with ``group_by``): the same numbers per frame group
  (:func:`metrics_by_group`, groups read by :func:`frame_groups`);
* ``parity.png``: predicted vs DFT energy per atom and force components (and virial components
  per atom when the data has virials).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlekf import keys as K
from rlekf.data.dataset import AtomsDataset, collate_atoms

__all__ = [
    "EvalResult",
    "compute_metrics",
    "format_group_table",
    "format_metrics",
    "frame_groups",
    "metrics_by_group",
    "parity_plot",
    "predict",
    "read_frames_csv",
    "write_csv",
    "write_outputs",
]

PathLike = str | os.PathLike

FRAMES_CSV = "predictions_frames.csv"
ATOMS_CSV = "predictions_atoms.csv"
PARITY_PNG = "parity.png"
METRICS_JSON = "metrics.json"
GROUPS_JSON = "metrics_by_group.json"

#: 1 eV/Å^3 in GPa.
EV_PER_A3_IN_GPA = 160.21766208


@dataclass
class EvalResult:
    """Predictions and labels of every evaluated frame (numpy, float64).

    Attributes:
        frame_id: (B,) id of each frame in its data set.
        source: (B,) file of each frame.
        index: (B,) index of each frame in its file.
        n_atoms: (B,) atoms per frame.
        energy_dft: (B,) eV.
        energy_pred: (B,) eV.
        atom_frame: (N,) position of each atom's frame in the arrays above.
        symbols: (N,) element symbol of each atom.
        forces_dft: (N, 3) eV/Å.
        forces_pred: (N, 3) eV/Å.
        has_virial: (B,) bool, frames with a virial label (``None``: virials not evaluated).
        virial_dft: (B, 3, 3) eV (zeros where there is no label).
        virial_pred: (B, 3, 3) eV.
        volume: (B,) Å^3 (0 for a cell that is not periodic in all three directions).
    """

    frame_id: np.ndarray
    source: list[str]
    index: np.ndarray
    n_atoms: np.ndarray
    energy_dft: np.ndarray
    energy_pred: np.ndarray
    atom_frame: np.ndarray
    symbols: np.ndarray
    forces_dft: np.ndarray
    forces_pred: np.ndarray
    has_virial: np.ndarray | None = None
    virial_dft: np.ndarray | None = None
    virial_pred: np.ndarray | None = None
    volume: np.ndarray | None = None

    @property
    def energy_per_atom_dft(self) -> np.ndarray:
        """(B,) eV/atom."""
        return self.energy_dft / self.n_atoms

    @property
    def energy_per_atom_pred(self) -> np.ndarray:
        """(B,) eV/atom."""
        return self.energy_pred / self.n_atoms


def predict(
    model: torch.nn.Module,
    dataset: AtomsDataset,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
    virial: bool | None = None,
) -> EvalResult:
    """Run ``model`` (a :class:`~rlekf.models.DeepPotential`) on every frame of ``dataset``.

    Args:
        model: the potential; its type map must be the one the data set was built with.
        dataset: frames with neighbour lists.
        batch_size: frames per forward pass.
        device: torch device.
        progress: show a rich progress bar.
        virial: predict virials; ``None`` = when some frame has a virial label.

    Returns:
        Predictions and labels in data-set order.
    """
    from ase.data import chemical_symbols

    model = model.to(device).eval()
    items = dataset.items
    has = np.array([bool(it[K.HAS_VIRIAL][0]) for it in items], dtype=bool)
    if virial is None:
        virial = bool(has.any())
    order = range(0, len(dataset), batch_size)
    e_p, f_p, w_p = [], [], []
    track: Iterable[int] = order
    if progress:
        from rich.progress import track as rich_track

        track = rich_track(order, description="evaluating", total=len(order))
    for start in track:
        chunk = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collate_atoms(chunk).items()}
        with torch.enable_grad():
            out = model(batch, forces=True, virial=virial)
        e_p.append(out[K.ENERGY].detach().double().cpu().numpy())
        f_p.append(out[K.FORCES].detach().double().cpu().numpy())
        if virial:
            w_p.append(out[K.VIRIAL].detach().double().cpu().numpy())
    n_atoms = np.array([int(it[K.N_ATOMS][0]) for it in items], dtype=np.int64)
    numbers = np.concatenate([it[K.NUMBERS].numpy() for it in items]) if items else np.zeros(0)
    return EvalResult(
        frame_id=np.array([int(it[K.FRAME_ID][0]) for it in items], dtype=np.int64),
        source=[f.source for f in dataset.frames],
        index=np.array([f.index for f in dataset.frames], dtype=np.int64),
        n_atoms=n_atoms,
        energy_dft=np.array([float(it[K.ENERGY][0]) for it in items], dtype=np.float64),
        energy_pred=np.concatenate(e_p) if e_p else np.zeros(0),
        atom_frame=np.repeat(np.arange(len(items)), n_atoms),
        symbols=np.array([chemical_symbols[int(z)] for z in numbers], dtype=object),
        forces_dft=(
            np.concatenate([it[K.FORCES].double().numpy() for it in items])
            if items
            else np.zeros((0, 3))
        ),
        forces_pred=np.concatenate(f_p) if f_p else np.zeros((0, 3)),
        **(_virials(items, has, w_p) if virial else {}),
    )


def _virials(items: list, has: np.ndarray, w_p: list[np.ndarray]) -> dict[str, np.ndarray]:
    """The virial fields of :class:`EvalResult` (labels, predictions, volumes)."""
    volume = []
    for it in items:
        periodic = bool(it[K.PBC][0].all())
        cell = it[K.CELL][0].double().numpy()
        volume.append(abs(float(np.linalg.det(cell))) if periodic else 0.0)
    return {
        "has_virial": has,
        "virial_dft": (
            np.concatenate([it[K.VIRIAL].double().numpy() for it in items])
            if items
            else np.zeros((0, 3, 3))
        ),
        "virial_pred": np.concatenate(w_p) if w_p else np.zeros((0, 3, 3)),
        "volume": np.array(volume, dtype=np.float64),
    }


def _rmse(err: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(err)))) if err.size else math.nan


def _mae(err: np.ndarray) -> float:
    return float(np.mean(np.abs(err))) if err.size else math.nan


def compute_metrics(result: EvalResult) -> dict[str, float]:
    """Energy errors per atom (eV/atom) and force errors (eV/Å), overall and per element.

    Returns:
        ``n_frames``, ``n_atoms``, ``energy_rmse``, ``energy_mae``, ``energy_mean_error``
        (over frames, of (E_pred − E_dft)/n: the mean is the constant offset), ``force_rmse``,
        ``force_mae`` (over all Cartesian components),
        and ``force_rmse/<El>``, ``force_mae/<El>`` over the atoms of each element. When
        frames with virial labels were evaluated: ``n_virial_frames``, ``virial_rmse``,
        ``virial_mae`` (eV/atom, of (W_pred − W_dft)/n over their 9 components) and
        ``stress_rmse``, ``stress_mae`` (GPa, of −(W_pred − W_dft)/volume, periodic frames).
    """
    e_err = result.energy_per_atom_pred - result.energy_per_atom_dft
    f_err = result.forces_pred - result.forces_dft
    out: dict[str, float] = {
        "n_frames": float(len(result.n_atoms)),
        "n_atoms": float(result.n_atoms.sum()),
        "energy_rmse": _rmse(e_err),
        "energy_mae": _mae(e_err),
        "energy_mean_error": float(np.mean(e_err)) if e_err.size else math.nan,
        "force_rmse": _rmse(f_err),
        "force_mae": _mae(f_err),
    }
    for el in sorted(set(result.symbols.tolist())):
        sel = result.symbols == el
        out[f"force_rmse/{el}"] = _rmse(f_err[sel])
        out[f"force_mae/{el}"] = _mae(f_err[sel])
    errors = virial_errors(result)
    if errors is not None:
        w_err, s_err = errors
        out["n_virial_frames"] = float(len(w_err))
        out["virial_rmse"] = _rmse(w_err)
        out["virial_mae"] = _mae(w_err)
        out["stress_rmse"] = _rmse(s_err)
        out["stress_mae"] = _mae(s_err)
    return out


def subset(result: EvalResult, frames: np.ndarray) -> EvalResult:
    """The frames ``frames`` ((B,) bool) of ``result`` with their atoms, in the same order."""
    frames = np.asarray(frames, dtype=bool)
    atoms = frames[result.atom_frame]
    new_pos = np.cumsum(frames) - 1  # old frame position -> new one
    pick = np.flatnonzero(frames)

    def opt(a):
        return None if a is None else a[pick]

    return EvalResult(
        frame_id=result.frame_id[pick],
        source=[result.source[i] for i in pick],
        index=result.index[pick],
        n_atoms=result.n_atoms[pick],
        energy_dft=result.energy_dft[pick],
        energy_pred=result.energy_pred[pick],
        atom_frame=new_pos[result.atom_frame[atoms]],
        symbols=result.symbols[atoms],
        forces_dft=result.forces_dft[atoms],
        forces_pred=result.forces_pred[atoms],
        has_virial=opt(result.has_virial),
        virial_dft=opt(result.virial_dft),
        virial_pred=opt(result.virial_pred),
        volume=opt(result.volume),
    )


def frame_groups(result: EvalResult, key: str) -> list[str]:
    """The group of every evaluated frame: the ``key`` entry of its ASE ``info``.

    Read again from each frame's file with :func:`ase.io.read` (extxyz comment-line keys such as
    mlearn's ``group`` or ``config_type``); a frame without the key is in group ``"-"``.

    Raises:
        ValueError: a file ASE cannot read, naming it.
    """
    from ase.io import read

    cache: dict[str, list[Any]] = {}
    out = []
    for src, idx in zip(result.source, result.index.tolist(), strict=True):
        if src not in cache:
            try:
                cache[src] = read(src, index=":")
            except Exception as exc:  # noqa: BLE001 (any reader error: name the file)
                raise ValueError(
                    f"{src}: cannot read frame groups ({key!r}) with ASE: {exc}"
                ) from exc
        frames = cache[src]
        if not 0 <= idx < len(frames):
            raise ValueError(f"{src}: frame {idx} is not in the file ({len(frames)} frames)")
        out.append(str(frames[idx].info.get(key, "-")))
    return out


def metrics_by_group(result: EvalResult, groups: Iterable[str]) -> dict[str, dict[str, float]]:
    """:func:`compute_metrics` over the frames of each group (``groups``: one per frame)."""
    labels = np.asarray(list(groups), dtype=object)
    if len(labels) != len(result.n_atoms):
        raise ValueError(f"{len(labels)} group labels for {len(result.n_atoms)} frames")
    return {g: compute_metrics(subset(result, labels == g)) for g in sorted(set(labels.tolist()))}


def format_group_table(groups: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table of per-group MAE and RMSE (energy meV/atom, force eV/Å)."""
    lines = [
        "| group | frames | energy MAE (meV/atom) | energy RMSE | mean energy error | "
        "force MAE (eV/Å) | force RMSE |",
        "|---|---|---|---|---|---|---|",
    ]
    for g, m in groups.items():
        lines.append(
            f"| {g} | {int(m['n_frames'])} | {1e3 * m['energy_mae']:.3g} | "
            f"{1e3 * m['energy_rmse']:.3g} | {1e3 * m['energy_mean_error']:+.3g} | "
            f"{m['force_mae']:.3g} | {m['force_rmse']:.3g} |"
        )
    return "\n".join(lines)


def virial_errors(result: EvalResult) -> tuple[np.ndarray, np.ndarray] | None:
    """Virial errors per atom ``(m, 3, 3)`` eV/atom and stress errors ``(m', 3, 3)`` GPa.

    Over the ``m`` frames with a virial label (``m'`` of them periodic); ``None`` when no
    virial was evaluated or no frame has a label.
    """
    if result.has_virial is None or not bool(np.any(result.has_virial)):
        return None
    assert result.virial_pred is not None and result.virial_dft is not None
    assert result.volume is not None
    has = result.has_virial
    d_w = result.virial_pred[has] - result.virial_dft[has]
    w_err = d_w / result.n_atoms[has][:, None, None]
    vol = result.volume[has]
    periodic = vol > 1e-12
    s_err = -d_w[periodic] / vol[periodic][:, None, None] * EV_PER_A3_IN_GPA
    return w_err, s_err


def format_metrics(
    metrics: Mapping[str, float], title: str = "", trained_on_virials: bool | None = None
) -> str:
    """Human-readable table of :func:`compute_metrics` (6 significant digits).

    ``trained_on_virials`` (from the checkpoint) qualifies the virial/stress lines.
    """
    lines = [title] if title else []
    lines.append(f"frames: {int(metrics['n_frames'])}, atoms: {int(metrics['n_atoms'])}")
    lines.append(f"energy RMSE: {metrics['energy_rmse']:.6g} eV/atom")
    lines.append(f"energy MAE:  {metrics['energy_mae']:.6g} eV/atom")
    if "energy_mean_error" in metrics:
        lines.append(f"energy mean error: {metrics['energy_mean_error']:+.6g} eV/atom")
    lines.append(f"force RMSE:  {metrics['force_rmse']:.6g} eV/Å")
    lines.append(f"force MAE:   {metrics['force_mae']:.6g} eV/Å")
    for key in sorted(k for k in metrics if k.startswith("force_rmse/")):
        el = key.split("/", 1)[1]
        lines.append(
            f"  {el:>2}: force RMSE {metrics[key]:.6g} eV/Å, "
            f"MAE {metrics[f'force_mae/{el}']:.6g} eV/Å"
        )
    if "virial_rmse" in metrics:
        lines.append(f"virial frames: {int(metrics['n_virial_frames'])}")
        lines.append(f"virial RMSE: {metrics['virial_rmse']:.6g} eV/atom")
        lines.append(f"virial MAE:  {metrics['virial_mae']:.6g} eV/atom")
        lines.append(f"stress RMSE: {metrics['stress_rmse']:.6g} GPa")
        lines.append(f"stress MAE:  {metrics['stress_mae']:.6g} GPa")
        if trained_on_virials is not True:
            known = "was not" if trained_on_virials is False else "is not known to be"
            lines.append(
                f"  (the model {known} trained on virials: its stress is the exact strain "
                "derivative of its energy, not fitted to DFT)"
            )
    return "\n".join(lines)


def write_csv(result: EvalResult, out_dir: PathLike) -> tuple[Path, Path]:
    """Write per-frame and per-atom predictions (see the module docstring).

    Returns:
        Paths of the frame CSV and the atom CSV.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames_path, atoms_path = out_dir / FRAMES_CSV, out_dir / ATOMS_CSV
    formulas = _formulas(result)
    with open(frames_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "frame_id",
                "source",
                "index",
                "n_atoms",
                "formula",
                "energy_dft",
                "energy_pred",
                "energy_per_atom_dft",
                "energy_per_atom_pred",
            ]
        )
        for b in range(len(result.n_atoms)):
            w.writerow(
                [
                    int(result.frame_id[b]),
                    result.source[b],
                    int(result.index[b]),
                    int(result.n_atoms[b]),
                    formulas[b],
                    repr(float(result.energy_dft[b])),
                    repr(float(result.energy_pred[b])),
                    repr(float(result.energy_per_atom_dft[b])),
                    repr(float(result.energy_per_atom_pred[b])),
                ]
            )
    starts = np.concatenate([[0], np.cumsum(result.n_atoms)[:-1]]).astype(np.int64)
    with open(atoms_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            ["frame_id", "atom", "element", "fx_dft", "fy_dft", "fz_dft"]
            + ["fx_pred", "fy_pred", "fz_pred"]
        )
        for a in range(len(result.symbols)):
            b = int(result.atom_frame[a])
            w.writerow(
                [int(result.frame_id[b]), a - int(starts[b]), result.symbols[a]]
                + [repr(float(x)) for x in result.forces_dft[a]]
                + [repr(float(x)) for x in result.forces_pred[a]]
            )
    return frames_path, atoms_path


def _formulas(result: EvalResult) -> list[str]:
    from collections import Counter

    out = []
    for b in range(len(result.n_atoms)):
        counts = Counter(result.symbols[result.atom_frame == b].tolist())
        out.append("".join(f"{el}{c}" for el, c in sorted(counts.items())))
    return out


def read_frames_csv(path: PathLike) -> dict[str, np.ndarray]:
    """Read ``predictions_frames.csv`` back (numeric columns as float64 arrays)."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols: dict[str, Any] = {}
    for key in rows[0] if rows else []:
        values = [r[key] for r in rows]
        try:
            cols[key] = np.array([float(v) for v in values])
        except ValueError:
            cols[key] = np.array(values, dtype=object)
    return cols


def parity_plot(
    result: EvalResult,
    path: PathLike,
    metrics: Mapping[str, float] | None = None,
    title: str = "",
    max_points: int = 200_000,
) -> Path:
    """Save a parity plot (PNG): energy per atom, force components and, when frames with
    virial labels were evaluated, virial components per atom (a third panel).

    Args:
        result: predictions.
        path: output PNG.
        metrics: :func:`compute_metrics` output (computed when missing); RMSEs go in legends.
        title: figure title.
        max_points: at most this many force components are drawn (random subset, seeded).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metrics = metrics if metrics is not None else compute_metrics(result)
    with_virial = virial_errors(result) is not None and "virial_rmse" in metrics
    n_panels = 3 if with_virial else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(5 * n_panels, 4.6), constrained_layout=True)
    ax_e, ax_f = axes[0], axes[1]
    e_x, e_y = result.energy_per_atom_dft, result.energy_per_atom_pred
    ax_e.scatter(
        e_x, e_y, s=10, alpha=0.7, label=f"RMSE {1000 * metrics['energy_rmse']:.3g} meV/atom"
    )
    _diagonal(ax_e, e_x, e_y)
    ax_e.set_xlabel("DFT energy (eV/atom)")
    ax_e.set_ylabel("predicted energy (eV/atom)")
    ax_e.set_title("energy per atom")
    ax_e.legend(loc="upper left")
    rng = np.random.default_rng(0)
    for el in sorted(set(result.symbols.tolist())):
        sel = result.symbols == el
        fx, fy = result.forces_dft[sel].reshape(-1), result.forces_pred[sel].reshape(-1)
        if fx.size > max_points:
            pick = rng.choice(fx.size, max_points, replace=False)
            fx, fy = fx[pick], fy[pick]
        rmse = metrics.get(f"force_rmse/{el}", math.nan)
        ax_f.scatter(fx, fy, s=3, alpha=0.4, label=f"{el}: RMSE {rmse:.3g} eV/Å")
    _diagonal(ax_f, result.forces_dft.reshape(-1), result.forces_pred.reshape(-1))
    ax_f.set_xlabel("DFT force component (eV/Å)")
    ax_f.set_ylabel("predicted force component (eV/Å)")
    ax_f.set_title(f"forces (all: RMSE {metrics['force_rmse']:.3g} eV/Å)")
    ax_f.legend(loc="upper left", markerscale=3)
    if with_virial:
        _virial_panel(axes[2], result, metrics)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _virial_panel(ax: Any, result: EvalResult, metrics: Mapping[str, float]) -> None:
    assert result.has_virial is not None and result.virial_dft is not None
    assert result.virial_pred is not None
    has = result.has_virial
    n = result.n_atoms[has][:, None, None]
    w_x = (result.virial_dft[has] / n).reshape(-1)
    w_y = (result.virial_pred[has] / n).reshape(-1)
    rmse = 1000 * metrics["virial_rmse"]
    ax.scatter(w_x, w_y, s=6, alpha=0.6, label=f"RMSE {rmse:.3g} meV/atom")
    _diagonal(ax, w_x, w_y)
    ax.set_xlabel("DFT virial component (eV/atom)")
    ax.set_ylabel("predicted virial component (eV/atom)")
    ax.set_title(f"virial per atom (stress RMSE {metrics['stress_rmse']:.3g} GPa)")
    ax.legend(loc="upper left")


def _diagonal(ax: Any, x: np.ndarray, y: np.ndarray) -> None:
    if x.size == 0:
        return
    finite = np.concatenate([x[np.isfinite(x)], y[np.isfinite(y)]])
    lo, hi = float(finite.min()), float(finite.max())
    pad = 0.02 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], "k--", lw=0.8)


def write_outputs(
    result: EvalResult, out_dir: PathLike, title: str = ""
) -> tuple[dict[str, float], dict[str, Path]]:
    """Compute metrics and write the CSVs, ``metrics.json`` and ``parity.png`` to ``out_dir``.

    Returns:
        The metrics and the paths written (keys ``frames_csv``, ``atoms_csv``, ``parity``,
        ``metrics``).
    """
    out_dir = Path(out_dir)
    metrics = compute_metrics(result)
    frames_csv, atoms_csv = write_csv(result, out_dir)
    png = parity_plot(result, out_dir / PARITY_PNG, metrics, title)
    metrics_path = out_dir / METRICS_JSON
    metrics_path.write_text(json.dumps(metrics, indent=1))
    paths = {"frames_csv": frames_csv, "atoms_csv": atoms_csv, "parity": png}
    paths["metrics"] = metrics_path
    return metrics, paths


def select_frames(datamodule: Any, split: str = "test") -> AtomsDataset:
    """The frames to evaluate from an :class:`~rlekf.data.AtomsDataModule`.

    Args:
        datamodule: the data module (built with the checkpoint's type map, rcut and sel).
        split: ``test`` (default), ``val`` or ``train`` split of the data config, or ``all``
            (every frame of ``path``, no split; ``max_frames`` still applies).

    Raises:
        ValueError: unknown ``split``.
        DataError: unreadable data, an element not in the type map, or neighbour overflow.
    """
    from rlekf.data.readers import read_frames_with_report

    if split == "all":
        frames, report = read_frames_with_report(
            datamodule.paths,
            datamodule.fmt,
            use_virial=datamodule.use_virial,
            on_error=datamodule.on_error,
        )
        if datamodule.max_frames is not None:
            frames = frames[: datamodule.max_frames]
        return AtomsDataset(
            frames, datamodule.type_map, datamodule.rcut, datamodule.sel, dtype=datamodule.dtype
        )
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be one of test, val, train, all; got {split!r}")
    datamodule.setup("test")
    return datamodule.datasets[split]
