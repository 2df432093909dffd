"""How one batch changes the weights: the Kalman updater (RLEKF) and the gradient updater (Adam).

Both are plain objects with ``update(model, batch, optimizer) -> predictions``; the
LightningModule owns neither the math nor the schedules. ``optimizer`` may be a
``torch.optim.Optimizer`` or Lightning's wrapper of one (its ``step`` counts global steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from rlekf.data import keys as K

__all__ = ["GradientUpdater", "KalmanUpdater", "deepmd_lr", "equal_atom_count"]


def equal_atom_count(batch: Mapping[str, Tensor]) -> int:
    """Atoms per frame of a batch whose frames all have the same size.

    Raises:
        ValueError: frames of different sizes (use the grouped batch sampler).
    """
    n_atoms = batch[K.N_ATOMS]
    n = int(n_atoms[0])
    if not bool(torch.all(n_atoms == n)):
        raise ValueError(
            f"the Kalman energy measurement needs frames of equal atom count in a batch, got "
            f"{n_atoms.tolist()}; use AtomsDataModule (its sampler groups frames by size)"
        )
    return n


class KalmanUpdater:
    """RLEKF training of one batch: one energy then several force pseudo-measurements.

    Follows reference §1.4–1.5: per-atom normalisation, the sign trick, prefactors, and the
    ``sqrt(batch size)`` factor. Force atoms are drawn with replacement from a seeded
    ``torch.Generator`` whose state is saved in checkpoints.

    Args:
        energy_prefactor: p_E.
        force_prefactor: p_F (2 in the paper-era code and PWMLFF, 1 in DeePMD-kit).
        n_select: atoms drawn per batch for force measurements (24).
        group_size: atoms per force measurement (6) → ``n_select / group_size`` updates.
        train_energy: run the energy measurement.
        train_force: run the force measurements.
        seed: seeds the atom sampling.
    """

    name = "kalman"

    def __init__(
        self,
        *,
        energy_prefactor: float = 1.0,
        force_prefactor: float = 2.0,
        n_select: int = 24,
        group_size: int = 6,
        train_energy: bool = True,
        train_force: bool = True,
        seed: int = 0,
    ) -> None:
        if n_select < 1 or group_size < 1 or n_select % group_size:
            raise ValueError(
                f"n_select ({n_select}) must be a positive multiple of group_size ({group_size})"
            )
        if energy_prefactor <= 0 or force_prefactor <= 0:
            raise ValueError("prefactors must be positive")
        if not (train_energy or train_force):
            raise ValueError("at least one of train_energy/train_force must be true")
        self.energy_prefactor = float(energy_prefactor)
        self.force_prefactor = float(force_prefactor)
        self.n_select = int(n_select)
        self.group_size = int(group_size)
        self.train_energy = train_energy
        self.train_force = train_force
        self.generator = torch.Generator().manual_seed(int(seed))

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def energy_measurement(self, model, batch, n: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Backward the signed energy measurement (H in ``.grad``); return ε and predictions."""
        out = model(batch, forces=False)
        e_pred = out[K.ENERGY]
        bs = e_pred.shape[0]
        p = self.energy_prefactor
        err = (batch[K.ENERGY].to(e_pred.dtype) - e_pred.detach()) / n
        sign = torch.sign(err)
        eps = math.sqrt(bs) * torch.mean(torch.abs(p * err))
        (torch.sum(sign * p * e_pred) / n).backward()
        return eps, out

    def force_measurement(
        self, model, batch, n: int, atoms: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Backward the signed force measurement on ``atoms`` of every frame; return ε."""
        out = model(batch, forces=True, create_graph=True)
        f_pred = out[K.FORCES]
        bs = f_pred.shape[0] // n
        f_sel = f_pred.reshape(bs, n, 3)[:, atoms]
        f_lab = batch[K.FORCES].to(f_pred.dtype).reshape(bs, n, 3)[:, atoms]
        p = self.force_prefactor
        delta = p * (f_lab - f_sel.detach())
        sign = torch.sign(delta)
        eps = math.sqrt(bs) * torch.mean(torch.abs(delta)) / n
        scalar = torch.sum(sign * p * f_sel) / (n * len(atoms) * 3)
        # the zero-weighted energy term gives every parameter a gradient (pytorch#43259)
        (scalar + 0.0 * out[K.ENERGY].sum()).backward()
        return eps, out

    def update(self, model, batch: Mapping[str, Tensor], optimizer) -> dict[str, Tensor]:
        """Apply 1 energy + n_select/group_size force updates; return the last predictions."""
        n = equal_atom_count(batch)
        out: dict[str, Tensor] = {}
        if self.train_energy:
            optimizer.zero_grad(set_to_none=True)
            eps, out = self.energy_measurement(model, batch, n)
            optimizer.step(error=eps)
        if self.train_force:
            atoms = torch.randint(n, (self.n_select,), generator=self.generator)
            for group in atoms.reshape(-1, self.group_size):
                optimizer.zero_grad(set_to_none=True)
                eps, out = self.force_measurement(
                    model, batch, n, group.to(batch[K.FORCES].device)
                )
                optimizer.step(error=eps)
        optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in out.items()}


def deepmd_lr(step: int, start_lr: float, stop_lr: float, decay_steps: int, stop_steps: int):
    """DeePMD-kit's exponential decay: start·r^⌊step/decay_steps⌋ reaching ``stop_lr`` at the end.

    r = (stop/start)^(decay_steps/stop_steps).
    """
    decay_steps = max(1, min(decay_steps, stop_steps))
    rate = math.exp(math.log(stop_lr / start_lr) * decay_steps / max(stop_steps, 1))
    return start_lr * rate ** (step // decay_steps)


class GradientUpdater:
    """DeePMD-style weighted energy/force(/virial) loss for Adam or any ``torch.optim`` optimizer.

    loss = p_e·MSE(E)/n + p_f·MSE(F) + p_v·MSE(W)/n, prefactors moving linearly in lr/start_lr
    from ``start_pref_*`` to ``limit_pref_*``; lr decays exponentially from ``start_lr`` to
    ``stop_lr`` over ``stop_steps`` batches (default: the whole run).

    Args:
        start_lr: initial learning rate.
        stop_lr: learning rate at the end of training.
        decay_steps: batches between decays (default: ``stop_steps // 100``).
        stop_steps: total batches of the schedule (default: set by the trainer).
        start_pref_e / limit_pref_e: energy prefactor at start / end.
        start_pref_f / limit_pref_f: force prefactor at start / end.
        start_pref_v / limit_pref_v: virial prefactor (used only if the data has virials).
    """

    name = "gradient"

    def __init__(
        self,
        *,
        start_lr: float = 1.0e-3,
        stop_lr: float = 3.51e-8,
        decay_steps: int | None = None,
        stop_steps: int | None = None,
        start_pref_e: float = 0.02,
        limit_pref_e: float = 1.0,
        start_pref_f: float = 1000.0,
        limit_pref_f: float = 1.0,
        start_pref_v: float = 0.0,
        limit_pref_v: float = 0.0,
    ) -> None:
        if not 0 < stop_lr <= start_lr:
            raise ValueError(f"need 0 < stop_lr <= start_lr, got {stop_lr}, {start_lr}")
        self.start_lr, self.stop_lr = float(start_lr), float(stop_lr)
        self.decay_steps = decay_steps
        self.stop_steps = stop_steps
        self.pref = {
            "e": (float(start_pref_e), float(limit_pref_e)),
            "f": (float(start_pref_f), float(limit_pref_f)),
            "v": (float(start_pref_v), float(limit_pref_v)),
        }
        self.step_count = 0
        self.last_lr = self.start_lr

    @property
    def trains_virial(self) -> bool:
        return max(self.pref["v"]) > 0

    def configure(self, total_steps: int) -> None:
        """Fix the schedule length when the run's number of batches is known."""
        if self.stop_steps is None:
            self.stop_steps = max(int(total_steps), 1)
        if self.decay_steps is None:
            self.decay_steps = max(self.stop_steps // 100, 1)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step_count": self.step_count,
            "stop_steps": self.stop_steps,
            "decay_steps": self.decay_steps,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.stop_steps = state["stop_steps"]
        self.decay_steps = state["decay_steps"]

    def lr(self, step: int) -> float:
        self.configure(1_000_000)
        return deepmd_lr(step, self.start_lr, self.stop_lr, self.decay_steps, self.stop_steps)

    def prefactor(self, key: str, lr: float) -> float:
        start, limit = self.pref[key]
        return limit + (start - limit) * lr / self.start_lr

    def loss(
        self, out: Mapping[str, Tensor], batch: Mapping[str, Tensor], lr: float, virial: bool
    ) -> Tensor:
        n = batch[K.N_ATOMS].to(out[K.ENERGY].dtype)
        de = out[K.ENERGY] - batch[K.ENERGY].to(out[K.ENERGY].dtype)
        loss = self.prefactor("e", lr) * torch.mean(de**2 / n)
        df = out[K.FORCES] - batch[K.FORCES].to(out[K.FORCES].dtype)
        loss = loss + self.prefactor("f", lr) * torch.mean(df**2)
        if virial:
            dv = (out[K.VIRIAL] - batch[K.VIRIAL].to(out[K.VIRIAL].dtype)).reshape(-1, 9)
            loss = loss + self.prefactor("v", lr) * torch.mean(dv**2 / n.unsqueeze(1))
        return loss

    def update(self, model, batch: Mapping[str, Tensor], optimizer, virial: bool = False):
        """One gradient step on the weighted loss; non-finite losses skip the step."""
        lr = self.lr(self.step_count)
        self.last_lr = lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        out = model(batch, forces=True, virial=virial, create_graph=True)
        loss = self.loss(out, batch, lr, virial)
        skipped = not bool(torch.isfinite(loss))
        if not skipped:
            loss.backward()
            grads_ok = all(
                p.grad is None or bool(torch.isfinite(p.grad).all())
                for g in optimizer.param_groups
                for p in g["params"]
            )
            skipped = not grads_ok
        if not skipped:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        preds = {k: v.detach() for k, v in out.items()}
        preds["loss"] = loss.detach()
        preds["skipped"] = torch.tensor(skipped)
        return preds
