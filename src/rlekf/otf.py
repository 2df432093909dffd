"""On-the-fly learning during MD with the Kalman filter (``rlekf-otf``).

A trained RLEKF checkpoint holds the weights, the weight-error covariance ``P`` and the
forgetting factor ``lambda``. :func:`run_otf` runs Langevin (NVT) MD with the model (optionally
ramping the target temperature and the cell's linear strain), and every ``check_every`` steps
computes the model's Kalman uncertainty ``σ`` of the current structure
(:class:`rlekf.uncertainty.KalmanUncertainty`). When ``σ > threshold`` it labels the structure
with a reference ASE calculator (EMT in the examples, any calculator such as VASP or GPAW for
users), adds the frame to a buffer and to ``labelled.extxyz``, and assimilates it with the
training updates of :class:`rlekf.training.updaters.KalmanUpdater` (energy and force
measurements, optionally replaying the ``replay`` previous buffer frames), then continues the MD
with the updated model.

Forgetting: every RLEKF update divides ``P`` by the forgetting factor ``lambda_t``, still
below 1 at the end of a training run (0.989 after 460 updates with the defaults). During MD,
where consecutive frames are alike, that inflates ``σ`` in every direction the new frames do not
measure, so a threshold on ``σ`` keeps calling the reference; :func:`run_otf` therefore sets
``lambda = 1`` by default (``forgetting=``), so that every assimilated frame only shrinks ``P``.

Uncertainty used for the decision (``sigma=``):

* ``"energy"`` (default): ``σ_E / n`` (eV/atom when the checkpoint is calibrated), ONE
  gradient of the energy and one quadratic form over ``P`` per check, whatever the atom count;
* ``"force"``: the largest per-atom ``σ_F,a`` (eV/Å), ``n`` gradients with the ``"signed"``
  estimator (``3n`` with ``"exact"``): ``n`` times the cost of the energy σ.

Outputs in ``out_dir``: ``trajectory.extxyz`` (every ``traj_every`` steps, with the model's
energy and forces), ``labelled.extxyz`` (the reference frames), ``checks.csv`` (every check:
step, temperatures, σ, threshold, called), ``calls.csv`` (every reference call: σ before and
after, the model's energy and force errors on the frame before and after assimilation),
``errors.csv`` (with ``error_every``: the model's error against the reference along the run,
diagnostic only: those reference evaluations are not assimilated), ``final.ckpt`` (the input
checkpoint with the updated weights, ``P``, ``lambda`` and updater state: same format, loadable
by :meth:`rlekf.calculator.DPCalculator.from_checkpoint` and by the training tools) and
``summary.json``.

Units: time in fs (input) and ps (logs), temperatures in K, energies in eV (per atom in the
logs), forces in eV/Å; force RMSEs are per component.
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlekf import keys as K
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.data.readers import Frame
from rlekf.utils.env import reproducible_blas_by_default

__all__ = [
    "SIGMAS",
    "OTFCall",
    "OTFResult",
    "atoms_batch",
    "frame_errors",
    "import_calculator",
    "label_atoms",
    "main",
    "ramp",
    "run_otf",
    "save_checkpoint",
    "set_forgetting",
]

PathLike = str | os.PathLike
#: Uncertainties :func:`run_otf` can threshold (see the module docstring).
SIGMAS = ("energy", "force")

log = logging.getLogger(__name__)

_CHECK_FIELDS = ("step", "time_ps", "temperature_K", "target_K", "strain", "sigma", "called")
_ERROR_FIELDS = (
    "step",
    "time_ps",
    "temperature_K",
    "target_K",
    "strain",
    "energy_error",
    "force_rmse",
    "force_rms",
    "relative_force_error",
)


@dataclass
class OTFCall:
    """One reference call (a row of ``calls.csv``).

    Attributes:
        step: MD step.
        time_ps: simulated time, ps.
        temperature_K: instantaneous temperature, K.
        target_K: thermostat target temperature, K.
        strain: linear strain of the cell relative to the start.
        sigma: the uncertainty that triggered the call (see :data:`SIGMAS`).
        sigma_after: the same uncertainty after assimilation.
        energy_error_before / energy_error_after: ``|E_model - E_ref| / n``, eV/atom.
        force_rmse_before / force_rmse_after: per-component force RMSE, eV/Å.
        force_rms: per-component RMS of the reference forces, eV/Å.
        kalman_updates: Kalman updates made so far in the run (cumulative).
    """

    step: int
    time_ps: float
    temperature_K: float
    target_K: float
    strain: float
    sigma: float
    sigma_after: float
    energy_error_before: float
    energy_error_after: float
    force_rmse_before: float
    force_rmse_after: float
    force_rms: float
    kalman_updates: int


@dataclass
class OTFResult:
    """What :func:`run_otf` did.

    Attributes:
        out_dir: the run folder.
        checkpoint: the final checkpoint.
        steps: MD steps run.
        n_checks: uncertainty checks made.
        calls: the reference calls, in order.
        kalman_updates: Kalman updates made (each ``KalmanUpdater`` batch makes
            ``1 + n_select/group_size``).
        seconds: wall-clock time of the run.
    """

    out_dir: Path
    checkpoint: Path
    steps: int
    n_checks: int
    calls: list[OTFCall] = field(default_factory=list)
    kalman_updates: int = 0
    seconds: float = 0.0

    @property
    def n_calls(self) -> int:
        """Reference calls made."""
        return len(self.calls)


# --------------------------------------------------------------------------- pure helpers
def ramp(step: int, start: float, end: float, ramp_steps: int) -> float:
    """Linear ramp from ``start`` (step 0) to ``end`` (step ``ramp_steps``), then constant.

    Args:
        step: MD step (>= 0).
        start / end: values at step 0 and at ``ramp_steps`` and after.
        ramp_steps: steps of the ramp (0: ``end`` from the start).
    """
    if ramp_steps <= 0:
        return float(end)
    x = min(max(step / ramp_steps, 0.0), 1.0)
    return float(start + (end - start) * x)


def import_calculator(path: str, kwargs: Mapping[str, Any] | None = None) -> Any:
    """An ASE calculator from an import path, e.g. ``"ase.calculators.emt.EMT"``.

    Args:
        path: ``module.attribute`` (or ``module:attribute``) of a calculator class or of a
            function returning a calculator.
        kwargs: keyword arguments of the call.

    Raises:
        ValueError: the path cannot be imported or does not give a calculator.
    """
    mod_name, sep, attr = path.replace(":", ".").rpartition(".")
    if not sep or not mod_name:
        raise ValueError(f"reference {path!r}: give module.Class, e.g. ase.calculators.emt.EMT")
    try:
        factory = getattr(importlib.import_module(mod_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reference {path!r} cannot be imported ({exc})") from exc
    calc = factory(**dict(kwargs or {}))
    if not hasattr(calc, "get_potential_energy") and not hasattr(calc, "calculate"):
        raise ValueError(f"reference {path!r} gave {type(calc).__name__}, not an ASE calculator")
    return calc


def label_atoms(atoms: Any, reference: Any, index: int = 0, source: str = "<otf>") -> Frame:
    """Label a copy of ``atoms`` with the ``reference`` calculator.

    Energy (eV) and forces (eV/Å) are required; the virial (``-stress · volume``, eV) is kept
    when the reference gives a stress for a periodic cell.

    Raises:
        ValueError: the reference returned non-finite energy or forces.
    """
    from ase.calculators.calculator import PropertyNotImplementedError

    ref = atoms.copy()
    ref.calc = reference
    energy = float(ref.get_potential_energy())
    forces = np.array(ref.get_forces(), dtype=np.float64)
    if not (math.isfinite(energy) and np.all(np.isfinite(forces))):
        raise ValueError(f"{source} frame {index}: the reference returned non-finite labels")
    virial = None
    if ref.pbc.all():
        try:
            virial = -ref.get_stress(voigt=False) * ref.get_volume()
        except PropertyNotImplementedError:
            virial = None
    return Frame(
        positions=ref.get_positions(),
        cell=np.asarray(ref.get_cell()),
        pbc=ref.get_pbc(),
        numbers=ref.get_atomic_numbers(),
        energy=energy,
        forces=forces,
        virial=virial,
        source=source,
        index=index,
    )


def atoms_batch(frame: Frame, model: Any) -> dict[str, torch.Tensor]:
    """The one-frame batch of ``frame`` for ``model`` (its type map, cutoff, ``sel``, dtype)."""
    return collate_atoms(
        [frame_to_item(frame, model.type_map, model.rcut, model.sel, frame.index, model.dtype)]
    )


def _unlabelled(atoms: Any, index: int) -> Frame:
    pos = atoms.get_positions()
    return Frame(
        positions=pos,
        cell=np.asarray(atoms.get_cell()),
        pbc=atoms.get_pbc(),
        numbers=atoms.get_atomic_numbers(),
        energy=0.0,
        forces=np.zeros_like(pos),
        source="<otf md>",
        index=index,
    )


def frame_errors(model: Any, batch: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """The model's errors on a labelled one-frame batch.

    Returns:
        ``energy_error`` ``|ΔE| / n`` (eV/atom), ``force_rmse`` (per component, eV/Å) and
        ``force_rms`` (per-component RMS of the labels, eV/Å).
    """
    with torch.enable_grad():
        out = model(batch, forces=True)
    n = float(batch[K.N_ATOMS][0])
    de = float(out[K.ENERGY].detach().double()[0] - batch[K.ENERGY].double()[0])
    df = out[K.FORCES].detach().double() - batch[K.FORCES].double()
    return {
        "energy_error": abs(de) / n,
        "force_rmse": float(torch.sqrt(torch.mean(df**2))),
        "force_rms": float(torch.sqrt(torch.mean(batch[K.FORCES].double() ** 2))),
    }


# --------------------------------------------------------------------------- checkpoints
def save_checkpoint(
    path: PathLike,
    source: Mapping[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    updater: Any,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``source`` (a loaded training checkpoint) with the new weights, ``P`` and ``lambda``.

    Every key of ``source`` is kept (Lightning's loops, callbacks, epoch and step, the model
    config); replaced are the ``model.*`` entries of ``state_dict``, ``optimizer_states`` and
    ``updater_state``; ``extra`` goes under ``otf``. Written atomically.
    """
    from rlekf.utils.io import atomic_write_bytes

    ckpt = dict(source)
    state = {k: v for k, v in ckpt.get("state_dict", {}).items() if not k.startswith("model.")}
    state.update({f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()})
    ckpt["state_dict"] = state
    ckpt["optimizer_states"] = [optimizer.state_dict()]
    ckpt["updater_state"] = updater.state_dict()
    if getattr(updater, "n_virial_updates", 0):
        ckpt["trained_on_virials"] = True
    if extra is not None:
        ckpt["otf"] = dict(extra)
    import io

    buf = io.BytesIO()
    torch.save(ckpt, buf)
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path


def set_forgetting(optimizer: torch.optim.Optimizer, lam: float) -> None:
    """Set the forgetting factor ``lambda_t`` of an RLEKF (through its state dict).

    Every Kalman update divides ``P`` by ``lambda_t``; ``lambda_{t+1} = nu lambda_t + 1 - nu``
    keeps 1 fixed, so ``lam = 1`` turns forgetting off for good (``P`` then only shrinks).

    Raises:
        ValueError: ``lam`` outside ``(0, 1]``.
    """
    if not 0.0 < lam <= 1.0:
        raise ValueError(f"the forgetting factor must be in (0, 1], got {lam}")
    sd = optimizer.state_dict()
    anchor = sd["param_groups"][0]["params"][0]
    sd["state"][anchor]["lam"] = float(lam)
    optimizer.load_state_dict(sd)


def _carry_calibration(src: Path, dst: Path, n_updates: int) -> None:
    """Copy the calibration sidecar of ``src`` to ``dst`` (same scale factors, new digest)."""
    from rlekf.uncertainty import _sha256, calibration_path
    from rlekf.utils.io import atomic_write_bytes

    cal = calibration_path(src)
    if not cal.is_file():
        return
    meta = json.loads(cal.read_text())
    meta["checkpoint"] = dst.name
    meta["checkpoint_sha256"] = _sha256(dst)
    meta["source"] = (
        f"scale factors carried over from {cal.name} ({meta.get('source', '')}); P changed by "
        f"{n_updates} on-the-fly Kalman updates since, not refitted"
    )
    atomic_write_bytes(calibration_path(dst), (json.dumps(meta, indent=2) + "\n").encode())


# --------------------------------------------------------------------------- the run
class _Csv:
    """Append rows to a CSV file, flushed after every row (readable while the run goes on)."""

    def __init__(self, path: Path, fields: Sequence[str]) -> None:
        self.fh = open(path, "w", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=list(fields))
        self.writer.writeheader()

    def write(self, row: Mapping[str, Any]) -> None:
        self.writer.writerow({k: row[k] for k in self.writer.fieldnames})
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def run_otf(
    checkpoint: PathLike,
    atoms: Any,
    reference: Any,
    out_dir: PathLike,
    *,
    steps: int = 1000,
    timestep_fs: float = 2.0,
    temperature_K: float = 300.0,
    temperature_end_K: float | None = None,
    ramp_steps: int | None = None,
    strain: float = 0.0,
    friction_per_fs: float = 0.01,
    check_every: int = 10,
    threshold: float = math.inf,
    sigma: str = "energy",
    force_estimator: str = "signed",
    replay: int = 0,
    repeats: int = 1,
    max_calls: int | None = None,
    error_every: int | None = None,
    traj_every: int = 10,
    seed: int = 0,
    updater: Mapping[str, Any] | None = None,
    forgetting: float | None = 1.0,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    on_call: Callable[[OTFCall], None] | None = None,
) -> OTFResult:
    """Langevin MD with on-the-fly Kalman learning from a reference calculator.

    Args:
        checkpoint: ``.ckpt`` of an RLEKF run (``rlekf-train optim=rlekf``); its calibration
            sidecar, when present, sets the scale of ``σ`` (else the raw scale of ``P``, with
            an :class:`~rlekf.uncertainty.UncalibratedWarning`).
        atoms: the starting structure (copied; its velocities are redrawn at
            ``temperature_K``).
        reference: the ASE calculator that labels frames (or its import path, see
            :func:`import_calculator`).
        out_dir: the run folder (created; files in it are overwritten).
        steps: MD steps.
        timestep_fs: time step, fs.
        temperature_K: initial and starting target temperature, K.
        temperature_end_K: target temperature at the end of the ramp (``None``: constant).
        ramp_steps: steps of the temperature and strain ramps (``None``: ``steps``).
        strain: linear strain of the cell at the end of the ramp (0.02: +2 % on every edge),
            applied linearly step by step with the atoms scaled.
        friction_per_fs: Langevin friction, 1/fs.
        check_every: steps between uncertainty checks (a check also at step 0).
        threshold: call the reference when ``σ > threshold`` (0: at every check; ``inf``:
            never), in the units of ``sigma``.
        sigma: ``"energy"`` (σ_E per atom, default: one gradient per check) or ``"force"``
            (largest per-atom σ_F; ``n`` or ``3n`` gradients).
        force_estimator: ``"signed"`` or ``"exact"`` (only for ``sigma="force"``).
        replay: after each new frame, also update on up to this many previous buffer frames
            (most recent first).
        repeats: passes of [new frame + replayed frames] per call.
        max_calls: stop calling the reference after this many calls (``None``: no limit).
        error_every: every this many steps evaluate the reference (not assimilated) and log
            the model's error in ``errors.csv`` (``None``: never; costs reference calls, for
            benchmarks with cheap references).
        traj_every: steps between trajectory frames.
        seed: seeds the initial velocities and the Langevin noise.
        updater: keyword arguments of :class:`~rlekf.training.updaters.KalmanUpdater`
            (prefactors, ``n_select``, ``group_size``, ``mode``...); its random state continues
            from the checkpoint's ``updater_state`` when there is one.
        forgetting: the RLEKF forgetting factor ``lambda`` for the run (:func:`set_forgetting`):
            1 (default) makes every assimilation shrink ``P``; ``None`` keeps the checkpoint's
            ``lambda_t < 1``, which divides ``P`` by ``lambda_t`` at every update and so grows
            ``σ`` in every direction the new frames do not measure.
        device: torch device of the model.
        trust_checkpoint: see :func:`rlekf.export.load_checkpoint`.
        on_call: called with every :class:`OTFCall` as it happens.

    Returns:
        The run's summary (see :class:`OTFResult`).

    Raises:
        rlekf.uncertainty.NoCovarianceError: the checkpoint holds no ``P`` (Adam).
        ValueError: bad arguments, or the structure does not fit the model (element, ``sel``).
    """
    from ase import units
    from ase.io import write
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import Stationary

    try:  # ase >= 3.29
        from ase.md.velocitydistribution import thermalize_momenta
    except ImportError:  # pragma: no cover - older ase
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution as thermalize_momenta

    from rlekf.calculator import DPCalculator
    from rlekf.export import _torch_load, load_checkpoint_with_info
    from rlekf.training.updaters import KalmanUpdater
    from rlekf.uncertainty import KalmanUncertainty

    if sigma not in SIGMAS:
        raise ValueError(f"unknown sigma {sigma!r}; choose one of {SIGMAS}")
    if steps < 0 or check_every < 1 or traj_every < 1 or repeats < 1 or replay < 0:
        raise ValueError(
            "need steps >= 0, check_every >= 1, traj_every >= 1, repeats >= 1, replay >= 0"
        )
    if error_every is not None and error_every < 1:
        raise ValueError(f"error_every must be >= 1 or None, got {error_every}")
    if not threshold >= 0:  # also refuses NaN
        raise ValueError(f"threshold must be >= 0 (inf: never call), got {threshold}")
    if isinstance(reference, str):
        reference = import_calculator(reference)
    checkpoint = Path(checkpoint)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    model, config, info = load_checkpoint_with_info(
        checkpoint, device, trust_checkpoint=trust_checkpoint
    )
    source = _torch_load(checkpoint, trust_checkpoint)
    unc = KalmanUncertainty.from_checkpoint(
        checkpoint,
        model,
        force_estimator=force_estimator if sigma == "force" else None,
        trust_checkpoint=trust_checkpoint,
    )
    optimizer = unc.covariance  # the run's RLEKF: P, lambda, bound to model's parameters
    if forgetting is not None:
        set_forgetting(optimizer, forgetting)
    kalman = KalmanUpdater(**{"seed": seed, **dict(updater or {})})
    if "updater_state" in source and "generator" in source["updater_state"]:
        kalman.load_state_dict(source["updater_state"])
    calc = DPCalculator.from_loaded(model, config, info, device=device)

    atoms = atoms.copy()
    atoms.calc = calc
    rng = np.random.default_rng(seed)
    t_end = temperature_K if temperature_end_K is None else float(temperature_end_K)
    n_ramp = steps if ramp_steps is None else int(ramp_steps)
    thermalize_momenta(atoms, temperature_K=temperature_K, rng=rng)
    Stationary(atoms)
    cell0 = np.asarray(atoms.get_cell()).copy()
    dyn = Langevin(
        atoms,
        timestep_fs * units.fs,
        temperature_K=temperature_K,
        friction=friction_per_fs / units.fs,
        rng=rng,
        fixcm=False,
    )

    traj_path, lab_path = out / "trajectory.extxyz", out / "labelled.extxyz"
    traj_path.unlink(missing_ok=True)
    lab_path.unlink(missing_ok=True)
    checks = _Csv(out / "checks.csv", (*_CHECK_FIELDS, "threshold"))
    calls_csv = _Csv(out / "calls.csv", tuple(OTFCall.__dataclass_fields__))
    errors_csv = _Csv(out / "errors.csv", _ERROR_FIELDS) if error_every else None
    buffer: list[dict[str, torch.Tensor]] = []
    result = OTFResult(out_dir=out, checkpoint=out / "final.ckpt", steps=0, n_checks=0)
    n_updates0 = int(optimizer.n_updates) if hasattr(optimizer, "n_updates") else 0

    def state(step: int) -> dict[str, float]:
        return {
            "step": step,
            "time_ps": step * timestep_fs / 1000.0,
            "temperature_K": float(atoms.get_temperature()),
            "target_K": ramp(step, temperature_K, t_end, n_ramp),
            "strain": ramp(step, 0.0, strain, n_ramp),
        }

    def measure(batch: Mapping[str, torch.Tensor]) -> float:
        if sigma == "energy":
            res = unc(batch, forces=False)
            return float(res["energy_std"][0]) / float(batch[K.N_ATOMS][0])
        return float(np.max(unc(batch, forces=True)["forces_std"]))

    def assimilate(batch: Mapping[str, torch.Tensor]) -> None:
        earlier = buffer[-replay:][::-1] if replay else []
        for _ in range(repeats):
            for b in (batch, *earlier):
                res = kalman.update(model, b, optimizer)
                if res.skipped:
                    log.warning("skipped %d non-finite Kalman update(s)", res.skipped)

    def check(step: int) -> None:
        row = state(step)
        batch = atoms_batch(_unlabelled(atoms, step), model)
        s = measure(batch)
        budget = max_calls is None or result.n_calls < max_calls
        called = bool(s > threshold) and budget
        result.n_checks += 1
        checks.write({**row, "sigma": s, "called": int(called), "threshold": threshold})
        if not called:
            return
        frame = label_atoms(atoms, reference, index=result.n_calls, source=str(lab_path))
        write(lab_path, frame.to_atoms(), format="extxyz", append=True)
        lbatch = atoms_batch(frame, model)
        before = frame_errors(model, lbatch)
        assimilate(lbatch)
        buffer.append(lbatch)
        after = frame_errors(model, lbatch)
        calc.reset()  # the weights changed: recompute the MD forces
        call = OTFCall(
            **row,
            sigma=s,
            sigma_after=measure(batch),
            energy_error_before=before["energy_error"],
            energy_error_after=after["energy_error"],
            force_rmse_before=before["force_rmse"],
            force_rmse_after=after["force_rmse"],
            force_rms=before["force_rms"],
            kalman_updates=int(getattr(optimizer, "n_updates", 0)) - n_updates0,
        )
        result.calls.append(call)
        calls_csv.write(asdict(call))
        if on_call is not None:
            on_call(call)

    def monitor(step: int) -> None:
        if errors_csv is None or step % error_every:
            return
        frame = label_atoms(atoms, reference, index=step, source="<otf monitor>")
        err = frame_errors(model, atoms_batch(frame, model))
        rel = err["force_rmse"] / err["force_rms"] if err["force_rms"] > 0 else math.nan
        errors_csv.write({**state(step), **err, "relative_force_error": rel})

    def per_step() -> None:
        step = dyn.nsteps
        dyn.set_temperature(temperature_K=ramp(step, temperature_K, t_end, n_ramp))
        if strain:
            f = 1.0 + ramp(step, 0.0, strain, n_ramp)
            atoms.set_cell(cell0 * f, scale_atoms=True)

    try:
        step = 0
        monitor(0)
        check(0)
        write(traj_path, atoms, format="extxyz", append=True)
        while step < steps:
            n = min(check_every - step % check_every, steps - step)
            for _ in range(n):
                dyn.run(1)
                step += 1
                per_step()
                monitor(step)
                if step % traj_every == 0:
                    write(traj_path, atoms, format="extxyz", append=True)
            if step % check_every == 0:
                check(step)
        result.steps = step
    finally:
        for f in (checks, calls_csv, errors_csv):
            if f is not None:
                f.close()
        result.kalman_updates = int(getattr(optimizer, "n_updates", 0)) - n_updates0
        result.seconds = time.perf_counter() - t_start
        summary = {
            "input_checkpoint": str(checkpoint),
            "final_checkpoint": str(result.checkpoint),
            "steps": result.steps,
            "checks": result.n_checks,
            "reference_calls": result.n_calls,
            "kalman_updates": result.kalman_updates,
            "sigma": sigma,
            "calibrated": bool(unc.calibrated),
            "threshold": threshold,
            "forgetting": forgetting,
            "seconds": result.seconds,
        }
        save_checkpoint(result.checkpoint, source, model, optimizer, kalman, extra=summary)
        if unc.calibrated:
            _carry_calibration(checkpoint, result.checkpoint, result.kalman_updates)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result


# --------------------------------------------------------------------------- CLI
def _structure(args: argparse.Namespace) -> Any:
    if args.structure:
        from ase.io import read

        return read(args.structure, index=-1)
    from rlekf.md import cu_supercell

    return cu_supercell(args.size, args.a)


def main(argv: list[str] | None = None) -> int:
    """``rlekf-otf CKPT [options]``: on-the-fly learning during Langevin MD.

    Returns:
        The exit status: 0 on success, 1 (message on stderr) for unusable input (checkpoint
        without ``P``, unreadable structure, element or ``sel`` mismatch, bad reference).
    """
    from rlekf.md import TRUST_HELP

    p = argparse.ArgumentParser(
        prog="rlekf-otf",
        description="Langevin MD with a trained RLEKF checkpoint; where the Kalman σ exceeds "
        "the threshold, label the structure with a reference ASE calculator and assimilate "
        "it with Kalman updates.",
    )
    p.add_argument("checkpoint", help=".ckpt from rlekf-train optim=rlekf")
    p.add_argument("--reference", default="ase.calculators.emt.EMT", help="import path")
    p.add_argument("--reference-kwargs", default="{}", help="JSON keyword arguments")
    p.add_argument("--structure", default=None, help="start structure (ASE-readable file)")
    p.add_argument("--size", type=int, default=3, help="fcc Cu cubic cells per edge")
    p.add_argument("--a", type=float, default=3.61, help="fcc Cu lattice constant, Å")
    p.add_argument("-o", "--out", default="otf_run", help="run folder")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--timestep", type=float, default=2.0, help="fs")
    p.add_argument("--temperature", type=float, default=300.0, help="start T, K")
    p.add_argument("--temperature-end", type=float, default=None, help="T after the ramp, K")
    p.add_argument("--ramp-steps", type=int, default=None, help="default: --steps")
    p.add_argument("--strain", type=float, default=0.0, help="linear strain after the ramp")
    p.add_argument("--friction", type=float, default=0.01, help="Langevin friction, 1/fs")
    p.add_argument("--check-every", type=int, default=10, help="steps between σ checks")
    p.add_argument("--threshold", type=float, required=True, help="call when σ > this")
    p.add_argument("--sigma", choices=SIGMAS, default="energy")
    p.add_argument("--force-estimator", choices=("signed", "exact"), default="signed")
    p.add_argument("--replay", type=int, default=0, help="earlier frames replayed per call")
    p.add_argument("--repeats", type=int, default=1, help="update passes per call")
    p.add_argument("--max-calls", type=int, default=None)
    p.add_argument("--error-every", type=int, default=None, help="log the true error (costly)")
    p.add_argument("--traj-every", type=int, default=10)
    p.add_argument(
        "--forgetting",
        default="1",
        help="RLEKF lambda during the run (1: no forgetting; 'keep': the checkpoint's)",
    )
    p.add_argument(
        "--train-virial",
        action="store_true",
        help="also assimilate the reference's virial (-stress·volume; periodic cells)",
    )
    p.add_argument("--n-select", type=int, default=24, help="KalmanUpdater n_select")
    p.add_argument("--group-size", type=int, default=6, help="KalmanUpdater group_size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    args = p.parse_args(argv)
    reproducible_blas_by_default()  # as rlekf-train: bits independent of memory alignment
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def report(c: OTFCall) -> None:
        print(
            f"step {c.step}: T {c.temperature_K:.0f} K, σ {c.sigma:.3g} -> {c.sigma_after:.3g}, "
            f"force RMSE {c.force_rmse_before:.3g} -> {c.force_rmse_after:.3g} eV/Å "
            f"(labels RMS {c.force_rms:.3g})"
        )

    try:
        reference = import_calculator(args.reference, json.loads(args.reference_kwargs))
        res = run_otf(
            args.checkpoint,
            _structure(args),
            reference,
            args.out,
            steps=args.steps,
            timestep_fs=args.timestep,
            temperature_K=args.temperature,
            temperature_end_K=args.temperature_end,
            ramp_steps=args.ramp_steps,
            strain=args.strain,
            friction_per_fs=args.friction,
            check_every=args.check_every,
            threshold=args.threshold,
            sigma=args.sigma,
            force_estimator=args.force_estimator,
            replay=args.replay,
            repeats=args.repeats,
            max_calls=args.max_calls,
            error_every=args.error_every,
            traj_every=args.traj_every,
            seed=args.seed,
            updater={
                "n_select": args.n_select,
                "group_size": args.group_size,
                "train_virial": args.train_virial,
            },
            forgetting=None if args.forgetting == "keep" else float(args.forgetting),
            device=args.device,
            trust_checkpoint=args.trust_checkpoint,
            on_call=report,
        )
    except (OSError, ValueError) as exc:  # NoCovarianceError, DataError are ValueErrors
        print(f"rlekf-otf: error: {exc}", file=sys.stderr)
        return 1
    print(
        f"{res.steps} steps, {res.n_checks} checks, {res.n_calls} reference calls, "
        f"{res.kalman_updates} Kalman updates in {res.seconds:.0f} s -> {res.checkpoint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
