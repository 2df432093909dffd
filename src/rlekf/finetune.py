"""Continue from a trained checkpoint: fine-tuning on new data and refitting the energy bias.

Library code behind ``rlekf-train ckpt_init=...`` and ``rlekf-change-bias`` (no Hydra, no
Lightning). Units: eV, eV/atom.

Energy bias (``change-bias``, as DeePMD-kit's ``dp change-bias``): the model's frame energy is
``E_f = sum_t c_ft b_t + E_net,f`` with ``c_ft`` the atoms of element ``t`` in frame ``f`` and
``b_t`` the per-element bias (:attr:`DeepPotential.energy_bias`). Given labelled frames, the
residual ``r_f = E_label,f - E_model,f`` is fitted by least squares against the counts,
``delta = argmin_d sum_f (r_f - sum_t c_ft d_t)^2`` (:func:`fit_bias_correction`), and the new
bias is ``b + delta``; weights (and an RLEKF's ``P``) are untouched. Elements without atoms in
the frames keep their bias.

Fine-tuning (:func:`init_optimizer`): an RLEKF optimizer of a new run takes the checkpoint's
covariance blocks and forgetting factor, and keeps, resets (``p0 * I``) or inflates ``P``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlekf import keys as K
from rlekf.data.dataset import AtomsDataset, collate_atoms
from rlekf.data.readers import Frame
from rlekf.models.deep_potential import DeepPotential
from rlekf.optim.rlekf import RLEKF

__all__ = [
    "COVARIANCE_POLICIES",
    "BiasChange",
    "InitCheckpoint",
    "change_bias_checkpoint",
    "check_new_elements",
    "element_counts",
    "fit_bias_correction",
    "init_optimizer",
    "load_raw_checkpoint",
    "predict_energies",
    "read_init_checkpoint",
    "refit_energy_bias",
    "validate_finetune_options",
]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

#: ``finetune.covariance`` choices: keep the checkpoint's ``P``, reset it to ``p0 * I``, or
#: multiply it by ``finetune.inflate``.
COVARIANCE_POLICIES: tuple[str, ...] = ("keep", "reset", "inflate")

#: Checkpoint key of the list of bias changes (one record per ``rlekf-change-bias``).
BIAS_CHANGES_KEY = "bias_changes"
#: Checkpoint key recording where a fine-tuned run started from.
FINETUNE_KEY = "finetune"


# ------------------------------------------------------------------------------ energy bias
def fit_bias_correction(counts: np.ndarray, residual: np.ndarray) -> np.ndarray:
    """Least-squares per-element energy correction.

    ``delta = argmin_d sum_f (residual_f - sum_t counts_ft d_t)^2``. Elements with no atom in
    any frame (all-zero columns) are left out of the fit and get ``delta_t = 0``: their bias
    is kept. If the remaining columns are linearly dependent (e.g. every frame has the same
    composition ratio), the minimum-norm solution is returned (``numpy.linalg.lstsq``, as
    DeePMD-kit).

    Args:
        counts: (F, n_types) atoms of each element per frame (non-negative integers).
        residual: (F,) eV, ``E_label - E_model`` per frame (total energies).

    Returns:
        (n_types,) float64, eV per atom of each element.

    Raises:
        ValueError: shapes that do not match, no frames, negative counts or non-finite values.
    """
    a = np.asarray(counts)
    r = np.asarray(residual, dtype=np.float64)
    if a.ndim != 2 or r.ndim != 1 or a.shape[0] != r.shape[0]:
        raise ValueError(
            f"counts must be (F, n_types) and residual (F,), got {a.shape} and {r.shape}"
        )
    if a.shape[0] == 0:
        raise ValueError("no frames to fit the energy bias on")
    if not np.all(np.isfinite(a)) or np.any(a < 0):
        raise ValueError("counts must be finite and non-negative")
    if not np.all(np.isfinite(r)):
        bad = np.flatnonzero(~np.isfinite(r)).tolist()
        raise ValueError(f"non-finite energy residual in frame(s) {bad[:10]}")
    a = a.astype(np.float64)
    present = a.sum(axis=0) > 0
    delta = np.zeros(a.shape[1], dtype=np.float64)
    if present.any():
        sol, *_ = np.linalg.lstsq(a[:, present], r, rcond=None)
        delta[present] = sol
    return delta


def element_counts(dataset: AtomsDataset, n_types: int) -> np.ndarray:
    """(F, n_types) int64: atoms of each type (index of the data set's type map) per frame."""
    return (
        np.stack(
            [np.bincount(it[K.TYPES].numpy(), minlength=n_types) for it in dataset.items]
        ).astype(np.int64)
        if len(dataset)
        else np.zeros((0, n_types), dtype=np.int64)
    )


@torch.no_grad()
def predict_energies(
    model: DeepPotential,
    dataset: AtomsDataset,
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """(F,) float64 eV: the model's total energy of every frame (no forces).

    The model is moved to ``device``; its train/eval mode is left as it was.
    """
    was_training = model.training
    model = model.to(device).eval()
    out = []
    try:
        for start in range(0, len(dataset), batch_size):
            chunk = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
            batch = {k: v.to(device) for k, v in collate_atoms(chunk).items()}
            out.append(model(batch, forces=False)[K.ENERGY].double().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class BiasChange:
    """What :func:`refit_energy_bias` changed.

    Attributes:
        type_map: element symbols, in type order.
        old_bias: (n_types,) eV.
        new_bias: (n_types,) eV.
        n_frames: frames fitted.
        atoms_per_type: (n_types,) atoms of each element over those frames (0: bias kept).
        energy_rmse_before: eV/atom, RMSE of the per-atom energy over the frames before.
        energy_rmse_after: eV/atom, the same with the new bias.
        data: where the frames came from (file names), for the record.
    """

    type_map: list[str]
    old_bias: np.ndarray
    new_bias: np.ndarray
    n_frames: int
    atoms_per_type: np.ndarray
    energy_rmse_before: float
    energy_rmse_after: float
    data: list[str] = field(default_factory=list)

    @property
    def delta(self) -> np.ndarray:
        """(n_types,) eV, ``new_bias - old_bias``."""
        return self.new_bias - self.old_bias

    def record(self) -> dict[str, Any]:
        """Plain Python values (loadable with ``torch.load(weights_only=True)``)."""
        return {
            "type_map": list(self.type_map),
            "old_bias": [float(x) for x in self.old_bias],
            "new_bias": [float(x) for x in self.new_bias],
            "n_frames": int(self.n_frames),
            "atoms_per_type": [int(x) for x in self.atoms_per_type],
            "energy_rmse_before": float(self.energy_rmse_before),
            "energy_rmse_after": float(self.energy_rmse_after),
            "data": list(self.data),
        }

    def summary(self) -> str:
        """One line per element: old -> new bias (eV), and the energy RMSE before/after."""
        lines = []
        for t, sym in enumerate(self.type_map):
            kept = " (no atoms in the frames: kept)" if self.atoms_per_type[t] == 0 else ""
            lines.append(
                f"  {sym}: {self.old_bias[t]:.6f} -> {self.new_bias[t]:.6f} eV "
                f"(change {self.delta[t]:+.6f}){kept}"
            )
        lines.append(
            f"  energy RMSE on the {self.n_frames} frames: {self.energy_rmse_before:.6f} -> "
            f"{self.energy_rmse_after:.6f} eV/atom"
        )
        return "\n".join(lines)


def _as_dataset(model: DeepPotential, frames: AtomsDataset | Sequence[Frame]) -> AtomsDataset:
    if isinstance(frames, AtomsDataset):
        return frames
    frames = list(frames)
    if frames and not isinstance(frames[0], Frame):
        raise TypeError(
            f"expected an AtomsDataset or rlekf.data.readers.Frame objects, got "
            f"{type(frames[0]).__name__} (read files with rlekf.data.readers.read_frames)"
        )
    return AtomsDataset(frames, model.type_map, model.rcut, model.sel, dtype=model.dtype)


def _check_type_map(dataset: AtomsDataset, type_map: Sequence[str]) -> None:
    """Refuse a data set whose type indices are not ``type_map``'s (built for another model)."""
    from ase.data import chemical_symbols

    pairs = set()
    for it in dataset.items:
        pairs |= set(zip(it[K.NUMBERS].tolist(), it[K.TYPES].tolist(), strict=True))
    wrong = sorted(
        (chemical_symbols[z], t)
        for z, t in pairs
        if not (0 <= t < len(type_map) and type_map[t] == chemical_symbols[z])
    )
    if wrong:
        raise ValueError(
            f"the data set was built with another type map than the model's {list(type_map)} "
            f"(element, type index): {wrong}; build it with the model's type_map, rcut and sel"
        )


def refit_energy_bias(
    model: DeepPotential,
    frames: AtomsDataset | Sequence[Frame],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    apply: bool = True,
) -> BiasChange:
    """Refit ``model.energy_bias`` on labelled frames (DeePMD-kit's ``dp change-bias``).

    The residual ``E_label - E_model`` of every frame (with the current bias) is fitted by
    :func:`fit_bias_correction` against the element counts; the new bias is the old plus that
    correction, so ``E_model`` changes by ``sum_t c_ft delta_t`` and nothing else changes.

    Args:
        model: the potential (its ``energy_bias`` is changed in place when ``apply``).
        frames: an :class:`~rlekf.data.AtomsDataset` built with the model's type map, cutoff
            and ``sel`` (e.g. ``datamodule.datasets["train"]``), or labelled
            :class:`~rlekf.data.readers.Frame` objects (neighbour lists are built here).
        batch_size: frames per forward pass.
        device: torch device of the forward passes.
        apply: write the new bias into ``model`` (``False``: only compute it).

    Returns:
        The old and new bias and the energy RMSE before and after (:class:`BiasChange`).
    """
    dataset = _as_dataset(model, frames)
    _check_type_map(dataset, model.type_map)
    n_types = model.ntypes
    counts = element_counts(dataset, n_types)
    labels = np.array([float(it[K.ENERGY][0]) for it in dataset.items], dtype=np.float64)
    pred = predict_energies(model, dataset, batch_size=batch_size, device=device)
    residual = labels - pred
    delta = fit_bias_correction(counts, residual)
    old = model.energy_bias.detach().cpu().double().numpy().copy()
    new = old + delta
    n_atoms = counts.sum(axis=1)
    after = residual - counts @ delta
    change = BiasChange(
        type_map=list(model.type_map),
        old_bias=old,
        new_bias=new,
        n_frames=len(dataset),
        atoms_per_type=counts.sum(axis=0),
        energy_rmse_before=float(np.sqrt(np.mean((residual / n_atoms) ** 2))),
        energy_rmse_after=float(np.sqrt(np.mean((after / n_atoms) ** 2))),
        data=sorted({str(f.source) for f in dataset.frames}),
    )
    if apply:
        with torch.no_grad():
            model.energy_bias.copy_(torch.as_tensor(new, dtype=model.energy_bias.dtype))
    return change


def change_bias_checkpoint(
    checkpoint: dict[str, Any], change: BiasChange, **info: Any
) -> dict[str, Any]:
    """A copy of a training checkpoint (``torch.load`` dict) with the new energy bias.

    Only ``state_dict["model.energy_bias"]`` is replaced (weights, optimizer state and ``P``
    are shared with the input, not copied); the change is appended to
    ``checkpoint["bias_changes"]``: a list of :meth:`BiasChange.record` dicts, each updated
    with ``info`` (plain values, e.g. ``source=`` the checkpoint it was applied to,
    ``split=``).

    Raises:
        ValueError: the checkpoint has no energy bias, or another type map.
    """
    state = checkpoint.get("state_dict", {})
    key = "model.energy_bias"
    if key not in state:
        raise ValueError("not an rlekf training checkpoint: no model.energy_bias in state_dict")
    type_map = list(checkpoint.get("model_config", {}).get("type_map", []))
    if type_map != change.type_map:
        raise ValueError(f"bias fitted for type_map {change.type_map}, checkpoint has {type_map}")
    out = dict(checkpoint)
    new_state = dict(state)
    new_state[key] = torch.as_tensor(change.new_bias, dtype=state[key].dtype).reshape(
        state[key].shape
    )
    out["state_dict"] = new_state
    record = {**change.record(), **info}
    out[BIAS_CHANGES_KEY] = [*checkpoint.get(BIAS_CHANGES_KEY, []), record]
    return out


# ------------------------------------------------------------------------------ fine-tuning
@dataclass
class InitCheckpoint:
    """A trained checkpoint to start a new run from.

    Attributes:
        path: the ``.ckpt`` file.
        model: the trained :class:`~rlekf.models.DeepPotential` (weights, descriptor
            statistics and energy bias as stored).
        model_config: its ``model_config``.
        optimizer_state: the optimizer's state dict (``None`` for a weights-only file, e.g.
            ``best_weights_*.ckpt``).
        epoch: the epoch the checkpoint was written at (``None`` if unknown).
    """

    path: Path
    model: DeepPotential
    model_config: dict[str, Any]
    optimizer_state: dict[str, Any] | None
    epoch: int | None = None

    def data_overrides(self) -> dict[str, Any]:
        """The data-module keywords the model fixes: type map, cutoffs, ``sel``, dtype."""
        keys = ("type_map", "rcut", "rcut_smth", "sel")
        return {k: copy.deepcopy(self.model_config[k]) for k in keys}


def load_raw_checkpoint(path: PathLike, *, trust_checkpoint: bool = False) -> dict[str, Any]:
    """The ``torch.load`` dict of a checkpoint already validated by
    :func:`rlekf.export.load_checkpoint_with_info` (memory-mapped where the file allows it,
    so a large ``P`` is read only when used; ``weights_only`` unless trusted)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint, mmap=True)
    except RuntimeError:  # a file of the legacy (non-zip) format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)


def read_init_checkpoint(path: PathLike, *, trust_checkpoint: bool = False) -> InitCheckpoint:
    """Read a checkpoint written by ``rlekf-train`` for fine-tuning.

    Raises:
        FileNotFoundError, ValueError: as :func:`rlekf.export.load_checkpoint_with_info`.
    """
    from rlekf.export import load_checkpoint_with_info

    path = Path(path)
    model, config, _ = load_checkpoint_with_info(path, "cpu", trust_checkpoint=trust_checkpoint)
    raw = load_raw_checkpoint(path, trust_checkpoint=trust_checkpoint)
    states = raw.get("optimizer_states") or []
    epoch = raw.get("epoch")
    return InitCheckpoint(
        path=path,
        model=model.train(),
        model_config=config,
        optimizer_state=states[0] if states else None,
        epoch=None if epoch is None else int(epoch),
    )


def check_new_elements(symbols: Iterable[str], type_map: Sequence[str], where: str) -> None:
    """Refuse data with elements the checkpoint's model has no networks for.

    Raises:
        ValueError: naming the elements and what to do.
    """
    new = sorted(set(symbols) - set(type_map))
    if new:
        raise ValueError(
            f"the data ({where}) holds element(s) {new} that checkpoint type_map "
            f"{list(type_map)} has no networks for; fine-tuning does not add elements. Train "
            f"a new model with data.type_map listing {sorted(set(type_map) | set(new))}, or "
            f"leave the frames with {new} out of the data"
        )


def _is_rlekf_state(state: dict[str, Any] | None) -> bool:
    if not state or len(state.get("param_groups", [])) != 1:
        return False
    group = state["param_groups"][0]
    anchor = state.get("state", {}).get(group["params"][0]) if group["params"] else None
    return anchor is not None and "lam" in anchor


# hyperparameters of the new run's config that stay in force after loading a checkpoint's
# state (Optimizer.load_state_dict would otherwise put the old run's values back)
_RUN_HYPERPARAMETERS = ("lambda0", "nu", "p0", "symmetrize_every")


def validate_finetune_options(
    covariance: str, inflate: float | None, lambda0: float | None, bias: str = "keep"
) -> None:
    """Check the ``finetune.*`` options (those of :func:`init_optimizer`, and ``bias``).

    Raises:
        ValueError: an unknown policy, ``inflate`` missing (or not positive) with the
            ``inflate`` policy or given with another, ``lambda0`` outside ``(0, 1]``, ``bias``
            neither ``keep`` nor ``refit``.
    """
    if bias not in ("keep", "refit"):
        raise ValueError(f"finetune.bias must be keep or refit, got {bias!r}")
    if covariance not in COVARIANCE_POLICIES:
        raise ValueError(
            f"finetune.covariance must be one of {COVARIANCE_POLICIES}, got {covariance!r}"
        )
    if covariance == "inflate":
        if inflate is None or not (0.0 < float(inflate) < float("inf")):
            raise ValueError(
                f"finetune.covariance=inflate needs finetune.inflate > 0, got {inflate!r}"
            )
    elif inflate is not None:
        raise ValueError(
            f"finetune.inflate={inflate} is only used with finetune.covariance=inflate "
            f"(got covariance={covariance!r})"
        )
    if lambda0 is not None and not (0.0 < float(lambda0) <= 1.0):
        raise ValueError(f"finetune.lambda0 must be in (0, 1], got {lambda0!r}")


def init_optimizer(
    optimizer: torch.optim.Optimizer,
    saved_state: dict[str, Any] | None,
    *,
    covariance: str = "keep",
    inflate: float | None = None,
    lambda0: float | None = None,
    where: str = "the checkpoint",
) -> str:
    """Start a new run's optimizer from a trained run's state.

    For :class:`~rlekf.optim.RLEKF` (and ``ShardedRLEKF``): the checkpoint's covariance
    blocks, forgetting factor ``lambda`` and counters are loaded
    (:meth:`~rlekf.optim.RLEKF.load_state_dict`: the block layout must match, i.e. the same
    ``block_size``); the new run's ``nu``, ``p0``, ``lambda0`` and ``symmetrize_every`` stay
    in force. Then ``covariance`` applies: ``keep`` ``P`` as it is, ``reset`` it to
    ``p0 * I`` (the new run's ``p0``), or ``inflate`` it (``P <- inflate * P``). ``lambda0``
    (not ``None``) restarts the forgetting factor at that value instead of the checkpoint's.

    Any other optimizer (Adam) starts fresh: its state is not carried over.

    Returns:
        A sentence saying what was done (for the log).

    Raises:
        ValueError: an unknown policy, ``inflate`` missing or given without ``inflate``
            policy, a checkpoint without RLEKF state with ``keep``/``inflate``, or another
            block layout.
    """
    validate_finetune_options(covariance, inflate, lambda0)
    if not isinstance(optimizer, RLEKF):
        return f"{type(optimizer).__name__} starts fresh (only RLEKF carries its state over)"
    if not _is_rlekf_state(saved_state):
        if covariance != "reset":
            raise ValueError(
                f"{where} holds no RLEKF state (a weights-only best_weights_* file, or a run "
                "trained with another optimizer), so there is no P to keep or inflate: give "
                "the run's checkpoints/last.ckpt, or set finetune.covariance=reset"
            )
        if lambda0 is not None:
            optimizer.state[optimizer.param_groups[0]["params"][0]]["lam"] = float(lambda0)
        return f"no RLEKF state in {where}: P = p0 * I and lambda from the configuration"
    assert saved_state is not None
    state = dict(saved_state)
    group = state["param_groups"][0]
    anchor_id = group["params"][0]
    if lambda0 is not None:
        state["state"] = {**state["state"], anchor_id: dict(state["state"][anchor_id])}
        state["state"][anchor_id]["lam"] = float(lambda0)
    mine = {k: optimizer.param_groups[0][k] for k in _RUN_HYPERPARAMETERS}
    try:
        optimizer.load_state_dict(state)
    except ValueError as exc:
        raise ValueError(
            f"cannot start from the RLEKF state of {where}: {exc} (fine-tuning keeps the "
            f"block layout: set optim.optimizer.block_size={group.get('block_size')} as in "
            "the checkpoint's run)"
        ) from exc
    optimizer.param_groups[0].update(mine)
    if covariance == "reset":
        optimizer.reset_covariance()
        what = f"P reset to p0 * I (p0 = {optimizer.param_groups[0]['p0']})"
    elif covariance == "inflate":
        optimizer.scale_covariance(float(inflate))
        what = f"P from {where} inflated by {float(inflate)}"
    else:
        what = f"P from {where} kept"
    return f"{what}; lambda = {optimizer.lam:.6g}, {optimizer.n_updates} updates before"
