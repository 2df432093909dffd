"""Independent references for the Kalman pseudo-measurements (reference §1.4–1.5).

Written from the reference text, not from ``rlekf.training.updaters``: the errors are explicit
loops over frames, atoms and components in numpy (float64), and the measurement gradients ``H``
are central finite differences of the signed, scaled prediction over the weights (no autograd
through the weights). Frames of a batch are stored one after another: atom ``a`` of frame ``b``
is row ``b * n + a`` of the ``(bs * n, 3)`` force array.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from rlekf.data import keys as K


def energy_reference(e_label, e_pred, n: int, p: float) -> tuple[float, np.ndarray]:
    """ε and signs of the energy measurement.

    Args:
        e_label, e_pred: ``(bs,)`` frame energies (eV).
        n: atoms per frame.
        p: energy prefactor p_E.

    Returns:
        ``(eps, s)``: ε = sqrt(bs) · mean_b |p (E_b^label − E_b^pred) / n| and the ``(bs,)``
        signs s_b of the per-atom errors.
    """
    e_label = np.asarray(e_label, dtype=np.float64)
    e_pred = np.asarray(e_pred, dtype=np.float64)
    bs = len(e_label)
    total = 0.0
    signs = np.zeros(bs)
    for b in range(bs):
        err = (e_label[b] - e_pred[b]) / n
        total += abs(p * err)
        signs[b] = 1.0 if err > 0 else (-1.0 if err < 0 else 0.0)
    return math.sqrt(bs) * total / bs, signs


def force_reference(f_label, f_pred, n: int, atoms, p: float) -> tuple[float, np.ndarray]:
    """ε and signs of one force measurement on ``atoms`` (the same atoms in every frame).

    Args:
        f_label, f_pred: ``(bs * n, 3)`` forces (eV/Å).
        n: atoms per frame.
        atoms: atom indices of the group (a repeated index counts each time).
        p: force prefactor p_F.

    Returns:
        ``(eps, s)``: ε = sqrt(bs) · mean |δ| / n over the ``bs · len(atoms) · 3`` components
        δ = p (F^label − F^pred), and their signs as ``(bs, len(atoms), 3)``.
    """
    f_label = np.asarray(f_label, dtype=np.float64)
    f_pred = np.asarray(f_pred, dtype=np.float64)
    bs = f_label.shape[0] // n
    atoms = [int(a) for a in atoms]
    signs = np.zeros((bs, len(atoms), 3))
    total, count = 0.0, 0
    for b in range(bs):
        for j, a in enumerate(atoms):
            for c in range(3):
                delta = p * (f_label[b * n + a, c] - f_pred[b * n + a, c])
                total += abs(delta)
                count += 1
                signs[b, j, c] = 1.0 if delta > 0 else (-1.0 if delta < 0 else 0.0)
    return math.sqrt(bs) * (total / count) / n, signs


def energy_scalar(out, signs: np.ndarray, n: int, p: float) -> float:
    """Σ_b s_b · p · E_b^pred / n (the scalar whose weight gradient is H)."""
    e = out[K.ENERGY].detach().double().numpy()
    return float(sum(signs[b] * p * e[b] for b in range(len(e))) / n)


def force_scalar(out, signs: np.ndarray, n: int, atoms, p: float) -> float:
    """Σ s · p · F^pred / (n · len(atoms) · 3) over the selected components."""
    f = out[K.FORCES].detach().double().numpy()
    atoms = [int(a) for a in atoms]
    total = 0.0
    for b in range(signs.shape[0]):
        for j, a in enumerate(atoms):
            for c in range(3):
                total += signs[b, j, c] * p * f[b * n + a, c]
    return total / (n * len(atoms) * 3)


def flat_weights(model) -> torch.Tensor:
    return torch.cat([q.detach().reshape(-1) for q in model.parameters()]).clone()


def set_weights(model, w: torch.Tensor) -> None:
    with torch.no_grad():
        off = 0
        for q in model.parameters():
            q.copy_(w[off : off + q.numel()].view_as(q))
            off += q.numel()


def predict(model, batch, forces: bool) -> dict:
    """Predictions at the model's current weights, detached."""
    out = model(batch, forces=forces)
    return {k: v.detach() for k, v in out.items()}


def fd_directional(model, batch, scalar, v: torch.Tensor, forces: bool, h: float = 1e-5):
    """Central difference (S(w + h v) − S(w − h v)) / 2h of ``scalar(predictions)``.

    The model's weights are restored afterwards.
    """
    w0 = flat_weights(model)
    try:
        set_weights(model, w0 + h * v)
        plus = scalar(predict(model, batch, forces))
        set_weights(model, w0 - h * v)
        minus = scalar(predict(model, batch, forces))
    finally:
        set_weights(model, w0)
    return (plus - minus) / (2 * h)


def random_directions(model, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` unit vectors in weight space (float64)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(q.numel() for q in model.parameters())
    dtype = next(model.parameters()).dtype
    out = []
    for _ in range(count):
        v = torch.randn(n, generator=g, dtype=torch.float64)
        out.append((v / v.norm()).to(dtype))
    return out


# the 6 independent components of a symmetric 3x3 tensor, written out by hand (Voigt order)
VOIGT_BY_HAND = [(0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1)]


def virial_reference(w_label, w_pred, has, n: int, p: float) -> tuple[float, np.ndarray]:
    """ε and signs of the virial measurement over the frames with a label.

    Args:
        w_label, w_pred: ``(bs, 3, 3)`` virials (eV); labels of unlabelled frames are never read.
        has: ``(bs,)`` which frames carry a label.
        n: atoms per frame.
        p: virial prefactor p_V.

    Returns:
        ``(eps, s)``: ε = sqrt(m) · mean |p (W^label − W^pred) / n| over the ``m`` labelled
        frames and the 6 independent components, and the signs as ``(bs, 6)`` (0 for frames
        without a label).
    """
    w_pred = np.asarray(w_pred, dtype=np.float64)
    bs = w_pred.shape[0]
    signs = np.zeros((bs, 6))
    total, count, m = 0.0, 0, 0
    for b in range(bs):
        if not bool(has[b]):
            continue
        m += 1
        for j, (r, c) in enumerate(VOIGT_BY_HAND):
            err = (float(w_label[b][r][c]) - w_pred[b, r, c]) / n
            total += abs(p * err)
            count += 1
            signs[b, j] = 1.0 if err > 0 else (-1.0 if err < 0 else 0.0)
    return math.sqrt(m) * total / count, signs


def virial_scalar(out, signs: np.ndarray, n: int, p: float) -> float:
    """Σ s · p · W^pred / n over the labelled frames' 6 components (signs 0 elsewhere)."""
    w = out[K.VIRIAL].detach().double().numpy()
    total = 0.0
    for b in range(signs.shape[0]):
        for j, (r, c) in enumerate(VOIGT_BY_HAND):
            if signs[b, j] != 0.0:
                total += signs[b, j] * p * w[b, r, c]
    return total / n


def predict_virial(model, batch) -> dict:
    """Energies and virials at the model's current weights, detached."""
    out = model(batch, forces=False, virial=True)
    return {k: v.detach() for k, v in out.items()}


def fd_virial_directional(model, batch, scalar, v: torch.Tensor, h: float = 1e-5) -> float:
    """Central difference over the weights of ``scalar(virial predictions)``."""
    w0 = flat_weights(model)
    try:
        set_weights(model, w0 + h * v)
        plus = scalar(predict_virial(model, batch))
        set_weights(model, w0 - h * v)
        minus = scalar(predict_virial(model, batch))
    finally:
        set_weights(model, w0)
    return (plus - minus) / (2 * h)
