r"""Predictive uncertainty of a trained Deep Potential from the RLEKF weight covariance ``P``.

An RLEKF run ends with a block-diagonal weight-error covariance ``P`` (kept in every
checkpoint). Linearising the model around its weights, the predictive variance of any output
``y`` is ``g^T P g`` with ``g = dy/dw`` (:meth:`rlekf.optim.RLEKF.predictive_variance`, read
from the stored blocks, no dense ``P``). This module turns it into

* the energy standard deviation ``σ_E = sqrt(s_E · g_E^T P g_E)`` of each frame (eV), one
  gradient per frame;
* a per-atom force standard deviation ``σ_F,a = sqrt(s_F · tr Σ_a)`` (eV/Å), ``Σ_a`` the
  3 × 3 predictive covariance of atom ``a``'s force: the quantity DeePMD-kit's model deviation
  reports per atom (the norm of the per-component standard deviations);
* the per-component virial standard deviation (eV), 9 gradients per frame.

Force estimators (``N`` atoms, every gradient is one double-backward pass through the force
graph, then one quadratic form over ``P``):

* ``"exact"``: the ``3N`` gradients ``dF_{a,c}/dw``; ``tr Σ_a`` exactly (and the
  per-component variances).
* ``"signed"``: ``N`` gradients of ``y_a = Σ_c s_{a,c} F_{a,c}`` with fixed random signs
  ``s_{a,c} = ±1``; ``Var(y_a) = s_a^T Σ_a s_a`` is an unbiased estimate of ``tr Σ_a`` (the
  sign average of ``s_c s_{c'}`` is ``δ_{cc'}``) at a third of the cost; its error is the
  off-diagonal part ``2 Σ_{c<c'} s_c s_{c'} Σ_{a,cc'}``.

Scale: ``P`` is in the units of the pseudo-measurements it was trained with (energies per
atom times ``p_E``, sign-weighted force sums times ``p_F / (3 n n_sel)``, an implied
measurement noise of about ``lambda``), so the raw ``g^T P g`` is off by an unknown factor,
different for energies and forces. :func:`calibrate_scale` fits one factor per quantity on
labelled held-out frames (the validation split) so that the root mean ``σ`` equals the RMSE
there; :func:`calibrate_checkpoint` stores them in a JSON sidecar next to the checkpoint
(:func:`calibration_path`: ``<checkpoint>.uncertainty.json``), which
:meth:`KalmanUncertainty.from_checkpoint` (and ``DPCalculator.from_checkpoint(...,
uncertainty=True)``) reads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from rlekf import keys as K
from rlekf.models.deep_potential import DeepPotential
from rlekf.optim.rlekf import RLEKF
from rlekf.utils.io import atomic_write_bytes

__all__ = [
    "CALIBRATION_FORMAT",
    "ESTIMATORS",
    "CovarianceLike",
    "IsotropicCovariance",
    "KalmanUncertainty",
    "NoCovarianceError",
    "UncalibratedWarning",
    "calibrate_checkpoint",
    "calibrate_scale",
    "calibration_path",
    "coverage",
    "flat_gradients",
    "gaussian_nll",
    "load_covariance",
    "predictive_variances",
]

PathLike = str | os.PathLike
#: Force estimators of :func:`predictive_variances` (see the module docstring).
ESTIMATORS = ("exact", "signed")
#: Version of the calibration sidecar written by :func:`calibrate_checkpoint`.
CALIBRATION_FORMAT = 1
_SIGN_SEED = 20261201


class NoCovarianceError(ValueError):
    """The checkpoint holds no Kalman covariance ``P`` (not trained with RLEKF)."""


class UncalibratedWarning(UserWarning):
    """Uncertainties in the raw scale of ``P`` (no calibration sidecar)."""


class CovarianceLike(Protocol):
    """Anything with ``predictive_variance(grads (k, N)) -> (k,)`` (RLEKF, ShardedRLEKF)."""

    def predictive_variance(self, grads: Tensor) -> Tensor: ...


class IsotropicCovariance:
    """``P = p0 · I``: the control that keeps the gradient norm and drops what ``P`` learnt.

    Args:
        p0: the variance per weight.
    """

    def __init__(self, p0: float = 1.0) -> None:
        self.p0 = float(p0)

    def predictive_variance(self, grads: Tensor) -> Tensor:
        """``p0 · |g_j|^2`` of ``(k, N)`` gradients, ``(k,)`` float64."""
        g = grads.reshape(-1, grads.shape[-1]).to(torch.float64)
        return (self.p0 * (g * g).sum(1)).cpu()


# --------------------------------------------------------------------------- gradients
def flat_gradients(outputs: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Gradients of each of ``k`` scalar outputs w.r.t. all ``params``, flattened.

    Args:
        outputs: ``(k,)`` outputs of a graph that depends on ``params`` (kept: the graph is
            retained).
        params: the parameters, in the order of the optimizer that holds ``P``.

    Returns:
        ``(k, N)`` tensor in the parameters' dtype; unused parameters give zero columns.
    """
    outputs = outputs.reshape(-1)
    rows = []
    for j in range(outputs.shape[0]):
        gs = torch.autograd.grad(outputs[j], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).reshape(-1)
                    for g, p in zip(gs, params, strict=True)
                ]
            )
        )
    return torch.stack(rows)


def _signs(n_atoms: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(n_atoms, 3)`` fixed ±1 signs of the ``"signed"`` estimator (seeded: deterministic)."""
    gen = torch.Generator().manual_seed(_SIGN_SEED)
    s = torch.randint(0, 2, (n_atoms, 3), generator=gen).to(dtype) * 2 - 1
    return s.to(device)


def predictive_variances(
    model: DeepPotential | torch.nn.Module,
    batch: Mapping[str, Tensor],
    covariance: CovarianceLike,
    *,
    forces: str | None = "exact",
    virial: bool = False,
) -> dict[str, Tensor]:
    """Raw linearised predictive variances ``g^T P g`` of a batch (no calibration scale).

    Args:
        model: the potential whose parameters ``covariance`` describes (same order).
        batch: a collated batch (any number of frames).
        covariance: :class:`~rlekf.optim.RLEKF` (or ``ShardedRLEKF``: collective) or
            :class:`IsotropicCovariance`.
        forces: ``"exact"``, ``"signed"`` (see the module docstring) or ``None`` (energy only).
        virial: also the 9 virial components of every frame.

    Returns:
        ``energy`` (B,) eV²; with ``forces``: ``forces`` (N,) eV²/Å², the estimate of
        ``tr Σ_a`` per atom, and for ``"exact"`` also ``forces_components`` (N, 3); with
        ``virial``: ``virial`` (B, 9) eV², row-major components. All float64 on the CPU,
        in the raw scale of ``P``. The predictions themselves are under ``prediction``
        (the model's output dict, detached).
    """
    if forces is not None and forces not in ESTIMATORS:
        raise ValueError(f"unknown force estimator {forces!r}; choose one of {ESTIMATORS}")
    params = [p for p in model.parameters()]
    need_grad = forces is not None or virial
    with torch.enable_grad():
        out = model(batch, forces=need_grad, virial=virial, create_graph=need_grad)
        n_frames = int(out[K.ENERGY].shape[0])
        parts = [out[K.ENERGY]]
        n_atoms = 0
        if forces is not None:
            f = out[K.FORCES]
            n_atoms = int(f.shape[0])
            if forces == "exact":
                parts.append(f.reshape(-1))
            else:
                parts.append((f * _signs(n_atoms, f.device, f.dtype)).sum(1))
        if virial:
            parts.append(out[K.VIRIAL].reshape(-1))
        outputs = torch.cat([p.reshape(-1).to(params[0].dtype) for p in parts])
        grads = flat_gradients(outputs, params)
    var = covariance.predictive_variance(grads).to(torch.float64).cpu()
    res: dict[str, Tensor] = {
        "prediction": {k: v.detach() for k, v in out.items()},
        "energy": var[:n_frames],
    }
    pos = n_frames
    if forces == "exact":
        comp = var[pos : pos + 3 * n_atoms].reshape(n_atoms, 3)
        res["forces_components"] = comp
        res["forces"] = comp.sum(1)
        pos += 3 * n_atoms
    elif forces == "signed":
        res["forces"] = var[pos : pos + n_atoms]
        pos += n_atoms
    if virial:
        res["virial"] = var[pos : pos + 9 * n_frames].reshape(n_frames, 9)
    return res


# --------------------------------------------------------------------------- calibration
def calibrate_scale(
    variance: Tensor | np.ndarray, sq_error: Tensor | np.ndarray, method: str = "rmse"
) -> float:
    """One scale factor ``s`` so that ``s · variance`` describes the squared errors.

    Args:
        variance: raw predicted variances (any shape).
        sq_error: squared errors of the same shape.
        method: ``"rmse"``: ``s = Σ e² / Σ v`` (the root mean ``σ`` equals the RMSE);
            ``"nll"``: ``s = mean(e² / v)``, the Gaussian maximum-likelihood factor.

    Returns:
        ``s`` (the units of ``sq_error`` per unit of ``variance``).

    Raises:
        ValueError: shapes differ, no values, or non-positive/non-finite variances.
    """
    v = np.asarray(variance, dtype=np.float64).reshape(-1)
    e = np.asarray(sq_error, dtype=np.float64).reshape(-1)
    if v.shape != e.shape or v.size == 0:
        raise ValueError(f"calibrate_scale needs equal non-empty shapes, got {v.shape}/{e.shape}")
    if not (np.all(np.isfinite(v)) and np.all(v > 0)):
        raise ValueError("calibrate_scale needs finite positive variances")
    if method == "rmse":
        return float(e.sum() / v.sum())
    if method == "nll":
        return float(np.mean(e / v))
    raise ValueError(f"unknown calibration method {method!r} (rmse or nll)")


def gaussian_nll(error: Tensor | np.ndarray, sigma: Tensor | np.ndarray) -> float:
    """Mean Gaussian negative log-likelihood ``½ log(2π σ²) + e² / (2σ²)`` (nats)."""
    e = np.asarray(error, dtype=np.float64).reshape(-1)
    s2 = np.asarray(sigma, dtype=np.float64).reshape(-1) ** 2
    return float(np.mean(0.5 * np.log(2 * math.pi * s2) + 0.5 * e**2 / s2))


def coverage(error: Tensor | np.ndarray, sigma: Tensor | np.ndarray, k: float = 1.0) -> float:
    """Fraction of ``|error| <= k σ`` (0.683 and 0.954 for k = 1, 2 if calibrated Gaussian)."""
    e = np.abs(np.asarray(error, dtype=np.float64).reshape(-1))
    s = np.asarray(sigma, dtype=np.float64).reshape(-1)
    return float(np.mean(e <= k * s))


# --------------------------------------------------------------------------- checkpoints
def calibration_path(checkpoint: PathLike) -> Path:
    """Where the calibration of ``checkpoint`` lives: ``<checkpoint>.uncertainty.json``."""
    p = Path(checkpoint)
    return p.with_name(p.name + ".uncertainty.json")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def load_covariance(
    checkpoint: PathLike | Mapping[str, Any],
    model: DeepPotential,
    *,
    trust_checkpoint: bool = False,
) -> RLEKF:
    """The RLEKF (weights' ``P``) of a training checkpoint, bound to ``model``'s parameters.

    The optimizer is rebuilt with the options saved in its own state dict (block size,
    weight order, tile, ``P`` dtype) and loaded from it, so ``predictive_variance`` reads
    exactly the blocks of the run. A checkpoint of a sharded run holds all blocks (gathered
    on rank 0 when saved) and loads in one process.

    Args:
        checkpoint: ``.ckpt`` path written by ``rlekf-train`` or the loaded dict.
        model: the checkpoint's model (:func:`rlekf.export.load_checkpoint`).
        trust_checkpoint: see :func:`rlekf.export.load_checkpoint`.

    Raises:
        NoCovarianceError: no optimizer state, or one without ``P`` (Adam, or RLEKF saved
            before its first update).
        ValueError: the covariance does not fit the model.
    """
    from rlekf.export import _torch_load

    where = "checkpoint"
    if not isinstance(checkpoint, Mapping):
        where = str(checkpoint)
        checkpoint = _torch_load(Path(checkpoint), trust_checkpoint)
    states = checkpoint.get("optimizer_states") or []
    if not states:
        raise NoCovarianceError(
            f"{where} holds no optimizer state, so no Kalman covariance P: Kalman uncertainty "
            "needs a checkpoint written by rlekf-train with optim=rlekf (for other models use a "
            "committee: rlekf-devi -m a.ckpt -m b.ckpt ...)"
        )
    sd = states[0]
    group = sd.get("param_groups", [{}])[0]
    anchor = sd.get("state", {}).get(group.get("params", [None])[0], {})
    if "block_size" not in group or "lambda0" not in group:
        kind = "Adam" if "betas" in group else "a non-RLEKF optimizer"
        raise NoCovarianceError(
            f"{where} was trained with {kind}: it holds no Kalman covariance P, so it has no "
            "Kalman uncertainty; train with optim=rlekf, or use a committee of checkpoints "
            "(rlekf-devi -m a.ckpt -m b.ckpt ...)"
        )
    if "sharding" in sd:
        raise ValueError(
            f"{where} holds one rank's shard of a ShardedRLEKF state, not every block of P: "
            "use the run's Lightning checkpoint (last.ckpt gathers all blocks on rank 0), or "
            "load the shards into a ShardedRLEKF on the same ranks and pass it as covariance"
        )
    if not anchor.get("P"):
        raise NoCovarianceError(
            f"{where}: the RLEKF state holds no P yet (saved before the first Kalman update)"
        )
    opt = RLEKF(
        model.parameters(),
        block_size=group["block_size"],
        lambda0=group["lambda0"],
        nu=group.get("nu", 0.9987),
        p0=group.get("p0", 1.0),
        p_dtype=group.get("p_dtype", "float64"),
        max_p_bytes=None,
        tile=group.get("tile"),
        weight_order=group.get("weight_order", "storage"),
    )
    try:
        opt.load_state_dict(sd)
    except (ValueError, KeyError) as exc:
        raise ValueError(f"{where}: its Kalman covariance does not fit the model ({exc})") from exc
    return opt


class KalmanUncertainty:
    """Calibrated Kalman uncertainties of a model: ``σ_E``, per-atom ``σ_F``, ``σ_virial``.

    Args:
        model: the potential.
        covariance: its RLEKF (see :func:`load_covariance`) or :class:`IsotropicCovariance`.
        energy_scale / force_scale / virial_scale: calibration factors (see
            :func:`calibrate_scale`); ``virial_scale=None`` uses ``force_scale``.
        force_estimator: ``"exact"`` or ``"signed"``.
        calibrated: whether the scales come from a calibration (reported in results).
    """

    def __init__(
        self,
        model: DeepPotential | torch.nn.Module,
        covariance: CovarianceLike,
        *,
        energy_scale: float = 1.0,
        force_scale: float = 1.0,
        virial_scale: float | None = None,
        force_estimator: str = "exact",
        calibrated: bool = False,
    ) -> None:
        if force_estimator not in ESTIMATORS:
            raise ValueError(f"unknown force estimator {force_estimator!r}; one of {ESTIMATORS}")
        self.model = model
        self.covariance = covariance
        self.energy_scale = float(energy_scale)
        self.force_scale = float(force_scale)
        self.virial_scale = float(force_scale if virial_scale is None else virial_scale)
        self.force_estimator = force_estimator
        self.calibrated = bool(calibrated)

    @classmethod
    def from_checkpoint(
        cls,
        path: PathLike,
        model: DeepPotential,
        *,
        force_estimator: str | None = None,
        calibration: PathLike | None = None,
        trust_checkpoint: bool = False,
    ) -> KalmanUncertainty:
        """Uncertainty of a checkpoint's model, calibrated by its sidecar when there is one.

        Args:
            path: ``.ckpt`` written by ``rlekf-train`` (trained with RLEKF).
            model: its model (:func:`rlekf.export.load_checkpoint`).
            force_estimator: ``None``: the one the calibration used (``"exact"`` without one).
            calibration: sidecar path (default :func:`calibration_path`); without a file the
                raw scale of ``P`` is used and :class:`UncalibratedWarning` is emitted.

        Raises:
            NoCovarianceError: the checkpoint holds no ``P``.
            ValueError: the sidecar is unreadable, of another format, or of another file.
        """
        path = Path(path)
        cal_path = Path(calibration) if calibration is not None else calibration_path(path)
        cov = load_covariance(path, model, trust_checkpoint=trust_checkpoint)
        if not cal_path.is_file():
            if calibration is not None:
                raise FileNotFoundError(f"calibration file {cal_path} not found")
            warnings.warn(
                f"{path} has no uncertainty calibration ({cal_path.name}): σ is in the raw "
                "scale of P (pseudo-measurement units, not eV); calibrate it on the validation "
                f"frames with `rlekf-devi -m {path} --calibrate VAL_DATA`",
                UncalibratedWarning,
                stacklevel=2,
            )
            return cls(model, cov, force_estimator=force_estimator or "exact")
        try:
            meta = json.loads(cal_path.read_text())
            scales = (meta["energy_scale"], meta["force_scale"], meta.get("virial_scale"))
            fmt, digest = int(meta["format"]), meta["checkpoint_sha256"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"calibration file {cal_path} is unreadable ({exc})") from exc
        if fmt != CALIBRATION_FORMAT:
            raise ValueError(
                f"{cal_path}: calibration format {fmt}, expected {CALIBRATION_FORMAT}"
            )
        if digest != _sha256(path):
            raise ValueError(
                f"{cal_path} calibrates another version of {path.name} (sha256 differs: the "
                "checkpoint was overwritten since); calibrate it again"
            )
        return cls(
            model,
            cov,
            energy_scale=scales[0],
            force_scale=scales[1],
            virial_scale=scales[2],
            force_estimator=force_estimator or meta.get("force_estimator", "exact"),
            calibrated=True,
        )

    def raw(
        self, batch: Mapping[str, Tensor], *, forces: bool = True, virial: bool = False
    ) -> dict[str, Tensor]:
        """:func:`predictive_variances` with this object's model, covariance and estimator."""
        return predictive_variances(
            self.model,
            batch,
            self.covariance,
            forces=self.force_estimator if forces else None,
            virial=virial,
        )

    def __call__(
        self, batch: Mapping[str, Tensor], *, forces: bool = True, virial: bool = False
    ) -> dict[str, Any]:
        """Calibrated standard deviations of a batch.

        Returns:
            ``energy_std`` (B,) eV (total energy), ``forces_std`` (N,) eV/Å (per atom,
            ``sqrt(tr Σ_a)``), ``virial_std`` (B, 3, 3) eV when asked, as float64 numpy
            arrays, ``prediction`` (the model's outputs) and ``calibrated`` (bool).
        """
        raw = self.raw(batch, forces=forces, virial=virial)
        res: dict[str, Any] = {
            "prediction": raw["prediction"],
            "calibrated": self.calibrated,
            "energy_std": _std(self.energy_scale, raw["energy"]),
        }
        if forces:
            res["forces_std"] = _std(self.force_scale, raw["forces"])
        if virial:
            v = _std(self.virial_scale, raw["virial"])
            res["virial_std"] = v.reshape(-1, 3, 3)
        return res


def _std(scale: float, variance: Tensor) -> np.ndarray:
    """``sqrt(scale · variance)``; rounding below zero (a PSD form near 0) reads as 0."""
    return np.sqrt(scale * np.clip(variance.numpy(), 0.0, None))


def calibrate_checkpoint(
    path: PathLike,
    batches: Sequence[Mapping[str, Tensor]],
    *,
    model: DeepPotential | None = None,
    force_estimator: str = "exact",
    method: str = "rmse",
    source: str = "",
    trust_checkpoint: bool = False,
) -> dict[str, Any]:
    """Fit the energy, force (and virial) scale factors on labelled frames; write the sidecar.

    Energy: per-atom errors against ``σ_E / n``; forces: per-atom ``|ΔF_a|²`` against
    ``tr Σ_a``; virial (frames with virial labels): per-component errors per atom.

    Args:
        path: the checkpoint.
        batches: collated labelled batches (the validation split).
        model: the checkpoint's model (loaded when ``None``).
        force_estimator: estimator used, and stored as the default of the checkpoint.
        method: see :func:`calibrate_scale`.
        source: description of the frames, stored.

    Returns:
        The sidecar's content (written atomically to :func:`calibration_path`).
    """
    from rlekf.export import load_checkpoint

    path = Path(path)
    if model is None:
        model, _ = load_checkpoint(path, trust_checkpoint=trust_checkpoint)
    cov = load_covariance(path, model, trust_checkpoint=trust_checkpoint)
    unc = KalmanUncertainty(model, cov, force_estimator=force_estimator)
    ve, ee, vf, ef, vv, ev = [], [], [], [], [], []
    n_frames = 0
    for batch in batches:
        has_v = bool(batch[K.HAS_VIRIAL].all())
        raw = unc.raw(batch, forces=True, virial=has_v)
        pred = raw["prediction"]
        n = batch[K.N_ATOMS].to(torch.float64)
        ve.append(raw["energy"] / n**2)
        ee.append(((pred[K.ENERGY].double() - batch[K.ENERGY].double()) / n) ** 2)
        vf.append(raw["forces"])
        ef.append(((pred[K.FORCES].double() - batch[K.FORCES].double()) ** 2).sum(1))
        if has_v:
            vv.append(raw["virial"] / n[:, None] ** 2)
            dv = (pred[K.VIRIAL].double() - batch[K.VIRIAL].double()).reshape(-1, 9)
            ev.append((dv / n[:, None]) ** 2)
        n_frames += int(n.shape[0])
    if not n_frames:
        raise ValueError("calibrate_checkpoint got no frames")
    meta: dict[str, Any] = {
        "format": CALIBRATION_FORMAT,
        "checkpoint": path.name,
        "checkpoint_sha256": _sha256(path),
        "method": method,
        "force_estimator": force_estimator,
        "source": source,
        "n_frames": n_frames,
        "energy_scale": calibrate_scale(torch.cat(ve), torch.cat(ee), method),
        "force_scale": calibrate_scale(torch.cat(vf), torch.cat(ef), method),
        "virial_scale": calibrate_scale(torch.cat(vv), torch.cat(ev), method) if vv else None,
        "energy_rmse_per_atom": float(torch.cat(ee).mean().sqrt()),
        "force_rmse_per_atom": float(torch.cat(ef).mean().sqrt()),
    }
    text = json.dumps(meta, indent=2) + "\n"
    atomic_write_bytes(calibration_path(path), text.encode())
    return meta
