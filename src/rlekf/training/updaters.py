"""How one batch changes the weights: the Kalman updater (RLEKF) and the gradient updater (Adam).

Both follow :class:`Updater`: ``update(model, batch, optimizer) -> UpdateResult`` (the
predictions, how many updates were skipped, what to log); the LightningModule owns neither the
math nor the schedules. ``optimizer`` may be a ``torch.optim.Optimizer`` or Lightning's wrapper
of one (its ``step`` counts global steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from rlekf.data import keys as K

__all__ = [
    "VIRIAL_COMPONENTS",
    "GradientUpdater",
    "KalmanUpdater",
    "UpdateResult",
    "Updater",
    "deepmd_lr",
    "equal_atom_count",
]

#: (row, column) of the 6 independent components of the symmetric 3x3 virial that the Kalman
#: virial measurement uses, in Voigt order xx, yy, zz, yz, xz, xy.
VIRIAL_COMPONENTS: tuple[tuple[int, int], ...] = ((0, 0), (1, 1), (2, 2), (1, 2), (0, 2), (0, 1))


@dataclass(frozen=True)
class UpdateResult:
    """What one batch's update did.

    Attributes:
        predictions: the model's last predictions of the batch (detached; energies ``(B,)`` in
            eV, forces ``(n_atoms_total, 3)`` in eV/Å, virials ``(B, 3, 3)`` in eV when made).
        skipped: updates of this batch skipped for a non-finite error, gradient or innovation
            (0: none).
        logs: values to log every step, ``{name: scalar}``.
        epoch_logs: values to log every step and averaged over the epoch, ``{name: scalar}``.
    """

    predictions: dict[str, Tensor]
    skipped: int = 0
    logs: dict[str, Tensor | float] = field(default_factory=dict)
    epoch_logs: dict[str, Tensor | float] = field(default_factory=dict)


@runtime_checkable
class Updater(Protocol):
    """How one batch changes the weights (what :class:`~rlekf.training.ForceFieldModule` calls).

    Attributes:
        trains_virial: whether the updater fits virial labels at all.
        masks_virial_labels: ``True`` when the updater leaves out frames without a virial
            label itself (then the module validates on virials whenever ``trains_virial``).
        skip_noun: what a skipped update is called in warnings, e.g. ``"Kalman update(s)"``.
    """

    masks_virial_labels: bool
    skip_noun: str

    @property
    def trains_virial(self) -> bool: ...

    def on_fit_start(self, total_steps: Callable[[], int]) -> None:
        """Called at the start of a fit; ``total_steps()`` gives the run's number of optimizer
        steps (called only by updaters that schedule over the run)."""

    def trained_on_virials(self, train_virial: bool) -> bool:
        """Whether the weights have been fitted to virial labels (``train_virial``: the
        module's switch)."""

    def update(
        self,
        model,
        batch: Mapping[str, Tensor],
        optimizer,
        *,
        virial: bool = False,
        backward: Callable[[Tensor], None] | None = None,
    ) -> UpdateResult:
        """Update the weights from one batch."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def _n_skipped(optimizer) -> int:
    """Skipped updates counted by a Kalman optimizer (unwrapping Lightning's wrapper)."""
    return int(getattr(getattr(optimizer, "optimizer", optimizer), "n_skipped", 0))


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
    """RLEKF training of one batch: [virial,] energy, then several force pseudo-measurements.

    Follows reference §1.4–1.5: per-atom normalisation, the sign trick, prefactors, and the
    ``sqrt(batch size)`` factor. Force atoms are drawn with replacement from a seeded
    ``torch.Generator`` whose state is saved in checkpoints.

    The virial measurement (``train_virial=True``, off by default) comes first, as in PWMLFF's
    order (virial, energy, force). It is formed like the energy measurement, over the ``m``
    frames of the batch that carry a virial label (``has_virial``) and the 6 independent
    components ``c`` of the symmetric virial (:data:`VIRIAL_COMPONENTS`): with per-atom errors
    ``e_bc = (W_bc^label - W_bc^pred) / n`` (eV/atom) and signs ``s_bc``,
    ``eps = sqrt(m) * mean_bc |p_V e_bc|`` and ``H = d/dw sum_bc s_bc p_V W_bc^pred / n``.
    Frames without a label are left out before any arithmetic (never given a fake label); a
    batch without any labelled frame makes no virial measurement at all (an update with
    ``H = 0`` would still divide ``P`` by ``lambda`` and advance ``lambda``). PWMLFF's
    ``update_virial`` uses all 9 components, which counts each shear component twice. Units:
    virials in eV (``-stress * volume``), so ``e_bc`` is in eV/atom like the energy error.

    Two modes (``k = 1 + n_select/group_size`` measurements per batch with energy and forces
    enabled, one more with a virial measurement):

    * ``"paper"`` (default, the paper's algorithm): each measurement gets a fresh forward pass
      at the current weights and its own rank-1 update (``optimizer.step``): ``k`` forward
      passes and ``k`` passes over ``P`` per batch.
    * ``"fused"`` (opt-in, faster, needs :class:`~rlekf.optim.RLEKF`): ONE forward pass with
      ``create_graph=True`` gives energy, forces (and virials: one more row of the rank-``k``
      update); the ``k`` measurement gradients ``H``
      come from ``k`` backward passes through that one graph (same scalars, signs,
      prefactors, normalisations and ``sqrt(bs)`` as in paper mode), then ONE rank-``k``
      update (:meth:`~rlekf.optim.RLEKF.step_k`, called through ``optimizer.step(error=...,
      grads=...)`` so that Lightning counts one global step per batch instead of ``k``).
      Differences from the paper: all ``k`` measurements (and their signs) are taken at the
      batch's starting weights instead of after each preceding update, and they are absorbed
      jointly (the ``k x k`` innovation matrix couples them); ``P`` is divided once per batch
      by the product of the ``k`` forgetting factors the paper would apply one by one (same
      total forgetting), and the ``lambda`` schedule still advances per measurement
      (``lambda <- 1 - (1 - lambda) nu^k``). ``n_updates`` still grows by ``k`` per batch.

    Args:
        energy_prefactor: p_E.
        force_prefactor: p_F (2 in the paper-era code and PWMLFF, 1 in DeePMD-kit).
        n_select: atoms drawn per batch for force measurements (24).
        group_size: atoms per force measurement (6) → ``n_select / group_size`` updates.
        train_energy: run the energy measurement.
        train_force: run the force measurements.
        train_virial: run the virial measurement (first) on batches with virial labels.
        virial_prefactor: p_V (1 in PWMLFF).
        seed: seeds the atom sampling.
        mode: ``"paper"`` (exact, default) or ``"fused"`` (one forward pass and one rank-k
            update per batch; see above).
        force_norm_atoms: the atom count ``N`` that divides the force measurement (ε by ``N``,
            ``H`` by ``18 N``). ``None`` (default, the paper's rule): the frame's own ``n``, so
            on data of mixed sizes a small frame's force measurement weighs ``n_big/n_small``
            times more in ε and in ``H`` than a big frame's for the same force errors. An
            integer: the same ``N`` for every frame (size-consistent: the measurement of a
            group of atoms no longer depends on how many other atoms the frame holds; equal to
            the paper's on frames of ``N`` atoms). The energy and virial measurements are
            per-atom quantities already and are not affected.
        energy_warmup_batches: the first this many batches (counted by this updater, kept in
            its state) make no force measurement: [virial +] energy updates only (an
            energy-only warm start; 0, the default, is the paper's schedule). Needs
            ``train_energy``.
    """

    MODES = ("paper", "fused")

    name = "kalman"
    masks_virial_labels = True
    skip_noun = "Kalman update(s)"

    def __init__(
        self,
        *,
        energy_prefactor: float = 1.0,
        force_prefactor: float = 2.0,
        n_select: int = 24,
        group_size: int = 6,
        train_energy: bool = True,
        train_force: bool = True,
        train_virial: bool = False,
        virial_prefactor: float = 1.0,
        seed: int = 0,
        mode: str = "paper",
        force_norm_atoms: int | None = None,
        energy_warmup_batches: int = 0,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(f"Invalid mode: {mode!r} (expected one of {self.MODES})")
        if n_select < 1 or group_size < 1 or n_select % group_size:
            raise ValueError(
                f"n_select ({n_select}) must be a positive multiple of group_size ({group_size})"
            )
        if energy_prefactor <= 0 or force_prefactor <= 0 or virial_prefactor <= 0:
            raise ValueError("prefactors must be positive")
        if not (train_energy or train_force or train_virial):
            raise ValueError("at least one of train_energy/train_force/train_virial must be true")
        if force_norm_atoms is not None and int(force_norm_atoms) < 1:
            raise ValueError(f"force_norm_atoms must be a positive count, got {force_norm_atoms}")
        if int(energy_warmup_batches) < 0:
            raise ValueError(f"energy_warmup_batches must be >= 0, got {energy_warmup_batches}")
        if int(energy_warmup_batches) > 0 and not train_energy:
            raise ValueError("energy_warmup_batches > 0 needs train_energy (an energy warm start)")
        self.energy_prefactor = float(energy_prefactor)
        self.force_prefactor = float(force_prefactor)
        self.n_select = int(n_select)
        self.group_size = int(group_size)
        self.train_energy = train_energy
        self.train_force = train_force
        self.train_virial = bool(train_virial)
        self.virial_prefactor = float(virial_prefactor)
        self.mode = mode
        self.force_norm_atoms = None if force_norm_atoms is None else int(force_norm_atoms)
        self.energy_warmup_batches = int(energy_warmup_batches)
        self.generator = torch.Generator().manual_seed(int(seed))
        #: virial measurements made so far (0 until a batch with virial labels was trained)
        self.n_virial_updates = 0
        #: batches updated on so far (the energy warm start counts them)
        self.n_batches = 0

    @property
    def trains_virial(self) -> bool:
        """Whether this updater makes virial measurements (on batches that have labels)."""
        return self.train_virial

    def on_fit_start(self, total_steps: Callable[[], int]) -> None:
        """Nothing to schedule (``lambda`` lives in the optimizer)."""

    def trained_on_virials(self, train_virial: bool) -> bool:
        """Whether a virial measurement has been made."""
        return self.n_virial_updates > 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator": self.generator.get_state(),
            "n_virial_updates": self.n_virial_updates,
            "n_batches": self.n_batches,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.n_virial_updates = int(state.get("n_virial_updates", 0))  # absent before virials
        self.n_batches = int(state.get("n_batches", 0))  # absent before the energy warm start

    @property
    def measures_forces(self) -> bool:
        """Whether the next batch makes force measurements (``train_force`` and the energy
        warm start is over)."""
        return self.train_force and self.n_batches >= self.energy_warmup_batches

    def _virial_frames(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """``(B,)`` bool mask of the frames the virial measurement uses, ``None`` for none."""
        if not self.train_virial or K.HAS_VIRIAL not in batch:
            return None
        has = batch[K.HAS_VIRIAL].to(torch.bool)
        return has if bool(has.any()) else None

    def energy_measurement(self, model, batch, n: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Backward the signed energy measurement (H in ``.grad``); return ε and predictions."""
        out = model(batch, forces=False)
        eps, scalar = self._energy_scalar(out[K.ENERGY], batch, n)
        scalar.backward()
        return eps, out

    def force_measurement(
        self, model, batch, n: int, atoms: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Backward the signed force measurement on ``atoms`` of every frame; return ε."""
        out = model(batch, forces=True, create_graph=True)
        eps, scalar = self._force_scalar(out, batch, n, atoms)
        scalar.backward()
        return eps, out

    def virial_measurement(self, model, batch, n: int) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Backward the signed virial measurement (H in ``.grad``); return ε and predictions.

        Returns ``None`` (nothing computed, ``.grad`` untouched) when the batch has no frame
        with a virial label or ``train_virial`` is off.
        """
        has = self._virial_frames(batch)
        if has is None:
            return None
        out = model(batch, forces=False, virial=True, create_graph=True)
        eps, scalar = self._virial_scalar(out, batch, n, has)
        scalar.backward()
        return eps, out

    def _virial_scalar(self, out, batch, n: int, has: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, scalar)`` of the virial measurement over the labelled frames ``has``."""
        rows = [r for r, _ in VIRIAL_COMPONENTS]
        cols = [c for _, c in VIRIAL_COMPONENTS]
        w_pred = out[K.VIRIAL][has][:, rows, cols]  # (m, 6) eV, labelled frames only
        w_lab = batch[K.VIRIAL][has].to(torch.float64)[:, rows, cols]
        m = w_pred.shape[0]
        p = self.virial_prefactor
        err = (w_lab - w_pred.detach().to(torch.float64)) / n
        eps = math.sqrt(m) * torch.mean(torch.abs(p * err))
        scalar = torch.sum(torch.sign(err).to(w_pred.dtype) * p * w_pred) / n
        # the zero-weighted energy term gives every parameter a gradient (pytorch#43259)
        return eps, scalar + 0.0 * out[K.ENERGY].sum()

    def _energy_scalar(self, e_pred: Tensor, batch, n: int) -> tuple[Tensor, Tensor]:
        """``(eps, scalar)`` of the energy measurement: backward ``scalar`` to get ``H``."""
        bs = e_pred.shape[0]
        p = self.energy_prefactor
        err = (batch[K.ENERGY].to(torch.float64) - e_pred.detach().to(torch.float64)) / n
        eps = math.sqrt(bs) * torch.mean(torch.abs(p * err))
        return eps, torch.sum(torch.sign(err) * p * e_pred) / n

    def _force_scalar(self, out, batch, n: int, atoms: Tensor) -> tuple[Tensor, Tensor]:
        """``(eps, scalar)`` of the force measurement on ``atoms`` of every frame."""
        f_pred = out[K.FORCES]
        bs = f_pred.shape[0] // n
        f_sel = f_pred.reshape(bs, n, 3)[:, atoms]
        f_lab = batch[K.FORCES].to(f_pred.dtype).reshape(bs, n, 3)[:, atoms]
        p = self.force_prefactor
        norm = n if self.force_norm_atoms is None else self.force_norm_atoms
        delta = p * (f_lab - f_sel.detach())
        eps = math.sqrt(bs) * torch.mean(torch.abs(delta)) / norm
        scalar = torch.sum(torch.sign(delta) * p * f_sel) / (norm * len(atoms) * 3)
        # the zero-weighted energy term gives every parameter a gradient (pytorch#43259)
        return eps, scalar + 0.0 * out[K.ENERGY].sum()

    def fused_measurements(
        self, model, batch, n: int, groups: Tensor | None, params
    ) -> tuple[Tensor, list[tuple[Tensor | None, ...]], dict[str, Tensor]]:
        """All measurements of a batch from ONE forward pass (fused mode).

        Args:
            groups: ``(n_groups, group_size)`` atom indices of the force measurements, or
                ``None`` for no force measurement.
            params: the parameters to differentiate (the optimizer's, in its order).

        Returns:
            ``(eps, H, out)``: the ``k`` errors as a ``(k,)`` tensor (the virial first when
            measured, then energy, then the force groups in order), the ``k`` gradient sets
            (one entry per parameter, ``None`` where a parameter does not reach the scalar)
            and the predictions. ``k = 0`` (empty ``eps``) when nothing is measured.
        """
        forces = groups is not None
        has = self._virial_frames(batch)
        virial = has is not None
        out = model(batch, forces=forces, virial=virial, create_graph=forces or virial)
        measurements: list[tuple[Tensor, Tensor]] = []
        if virial:
            measurements.append(self._virial_scalar(out, batch, n, has))
        if self.train_energy:
            measurements.append(self._energy_scalar(out[K.ENERGY], batch, n))
        if forces:
            for group in groups:
                measurements.append(self._force_scalar(out, batch, n, group))
        if not measurements:
            return torch.zeros(0, dtype=torch.float64), [], out
        eps = torch.stack([e for e, _ in measurements])
        grads = []
        for j, (_, scalar) in enumerate(measurements):
            last = j == len(measurements) - 1
            grads.append(
                torch.autograd.grad(scalar, params, retain_graph=not last, allow_unused=True)
            )
        return eps, grads, out

    def update(
        self,
        model,
        batch: Mapping[str, Tensor],
        optimizer,
        *,
        virial: bool = False,
        backward: Callable[[Tensor], None] | None = None,
    ) -> UpdateResult:
        """Apply [1 virial +] 1 energy + n_select/group_size force updates.

        In ``"fused"`` mode these are one rank-k update from one forward pass (class doc).
        ``virial`` and ``backward`` are not used: the virial measurement follows
        ``train_virial``, and each measurement's gradient is that of one replica (under data
        parallelism :class:`~rlekf.optim.ShardedRLEKF` averages them).

        Returns:
            the last predictions and the number of skipped (non-finite) updates; nothing to
            log (the Kalman state is logged by :class:`~rlekf.training.callbacks.KalmanMonitor`).
        """
        n = equal_atom_count(batch)
        before = _n_skipped(optimizer)
        if self.mode == "fused":
            out = self._update_fused(model, batch, optimizer, n)
        else:
            out = self._update_paper(model, batch, optimizer, n)
        self.n_batches += 1
        return UpdateResult(out, skipped=_n_skipped(optimizer) - before)

    def _update_paper(self, model, batch, optimizer, n: int) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self._virial_frames(batch) is not None:
            optimizer.zero_grad(set_to_none=True)
            measured = self.virial_measurement(model, batch, n)
            assert measured is not None
            eps, out = measured
            optimizer.step(error=eps)
            self.n_virial_updates += 1
        if self.train_energy:
            optimizer.zero_grad(set_to_none=True)
            eps, out = self.energy_measurement(model, batch, n)
            optimizer.step(error=eps)
        if self.measures_forces:
            atoms = torch.randint(n, (self.n_select,), generator=self.generator)
            for group in atoms.reshape(-1, self.group_size):
                optimizer.zero_grad(set_to_none=True)
                eps, out = self.force_measurement(
                    model, batch, n, group.to(batch[K.FORCES].device)
                )
                optimizer.step(error=eps)
        optimizer.zero_grad(set_to_none=True)
        return {k: v.detach() for k, v in out.items()}

    def _update_fused(self, model, batch, optimizer, n: int) -> dict[str, Tensor]:
        groups = None
        if self.measures_forces:
            atoms = torch.randint(n, (self.n_select,), generator=self.generator)
            groups = atoms.reshape(-1, self.group_size).to(batch[K.FORCES].device)
        params = optimizer.param_groups[0]["params"]
        optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            eps, grads, out = self.fused_measurements(model, batch, n, groups, params)
        if len(eps):
            # through step (not step_k) so that a Lightning wrapper counts the global step
            optimizer.step(error=eps.detach(), grads=grads)
            if self._virial_frames(batch) is not None:
                self.n_virial_updates += 1
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
    masks_virial_labels = False
    skip_noun = "gradient step(s)"

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
        self.n_skipped = 0
        self.last_lr = self.start_lr

    @property
    def trains_virial(self) -> bool:
        return max(self.pref["v"]) > 0

    def trained_on_virials(self, train_virial: bool) -> bool:
        """Whether the loss has a virial term (``train_virial`` on and a positive prefactor)."""
        return bool(train_virial and self.trains_virial)

    def on_fit_start(self, total_steps: Callable[[], int]) -> None:
        """Fix the schedule length to the run's (unless given)."""
        self.configure(int(total_steps()))

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
            "n_skipped": self.n_skipped,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.stop_steps = state["stop_steps"]
        self.decay_steps = state["decay_steps"]
        self.n_skipped = int(state.get("n_skipped", 0))  # absent in checkpoints before 2026-12-04

    def lr(self, step: int) -> float:
        self.configure(1_000_000)
        return deepmd_lr(step, self.start_lr, self.stop_lr, self.decay_steps, self.stop_steps)

    def prefactor(self, key: str, lr: float) -> float:
        start, limit = self.pref[key]
        return limit + (start - limit) * lr / self.start_lr

    def loss(
        self, out: Mapping[str, Tensor], batch: Mapping[str, Tensor], lr: float, virial: bool
    ) -> Tensor:
        n = batch[K.N_ATOMS].to(torch.float64)
        de = out[K.ENERGY].to(torch.float64) - batch[K.ENERGY].to(torch.float64)
        loss = self.prefactor("e", lr) * torch.mean(de**2 / n)
        df = out[K.FORCES] - batch[K.FORCES].to(out[K.FORCES].dtype)
        loss = loss + self.prefactor("f", lr) * torch.mean(df**2)
        if virial:
            dv = (out[K.VIRIAL] - batch[K.VIRIAL].to(out[K.VIRIAL].dtype)).reshape(-1, 9)
            loss = loss + self.prefactor("v", lr) * torch.mean(dv**2 / n.unsqueeze(1))
        return loss

    def update(
        self,
        model,
        batch: Mapping[str, Tensor],
        optimizer,
        *,
        virial: bool = False,
        backward: Callable[[Tensor], None] | None = None,
    ) -> UpdateResult:
        """One gradient step on the weighted loss; non-finite losses skip the step.

        Args:
            virial: add the virial term to the loss.
            backward: how to backpropagate the loss; the LightningModule passes its
                ``manual_backward`` (under DDP that is what all-reduces the gradients).

        Returns:
            the predictions, ``skipped`` 1 for a skipped step, the learning rate and the
            number of steps skipped so far in the run to log (``train/lr``,
            ``train/skipped``) and the loss to log and average over the epoch (``train/loss``).
        """
        lr = self.lr(self.step_count)
        self.last_lr = lr
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        out = model(batch, forces=True, virial=virial, create_graph=True)
        loss = self.loss(out, batch, lr, virial)
        skipped = not bool(torch.isfinite(loss))
        if not skipped:
            (backward or Tensor.backward)(loss)
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
        self.n_skipped += int(skipped)
        preds = {k: v.detach() for k, v in out.items()}
        return UpdateResult(
            preds,
            skipped=int(skipped),
            logs={"train/lr": lr, "train/skipped": float(self.n_skipped)},
            epoch_logs={"train/loss": loss.detach()},
        )
