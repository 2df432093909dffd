"""ASE calculator for trained Deep Potentials: ``DPCalculator``.

Use a checkpoint written by ``rlekf-train`` or a file written by ``rlekf-export``::

    from rlekf.calculator import DPCalculator
    atoms.calc = DPCalculator.from_checkpoint("logs/train/runs/.../checkpoints/last.ckpt")
    atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()

The neighbour list is rebuilt on every call (any cell, periodic or not, any atom count).
Results: ``energy``/``free_energy`` (eV), ``energies`` (per atom, eV), ``forces`` (eV/Å) and,
when asked for and the cell is periodic in all three directions, ``stress`` (eV/Å³, ASE Voigt
order xx, yy, zz, yz, xz, xy), computed as ``-virial / volume`` from the model's strain
derivative: the exact stress of the model, whether or not it was trained on virials (its
accuracy against DFT is only known when it was). Non-periodic or partly periodic cells give no
stress (``PropertyNotImplementedError``). ``calc.trained_on_virials`` says whether the model was
fitted to virial labels (from the checkpoint or exported file; ``None`` when the file predates
that record); the first stress of a calculator whose model was not warns once
(:class:`StressNotTrainedWarning`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from rlekf import keys as K
from rlekf.data.converter import AtomsConverter, UnknownElementError
from rlekf.export import load_checkpoint_with_info, load_exported
from rlekf.models.deep_potential import DeepPotential, resolve_dtype

__all__ = ["DPCalculator", "StressNotTrainedWarning", "UnknownElementError"]

PathLike = str | os.PathLike


class StressNotTrainedWarning(UserWarning):
    """A stress was computed by a model that was not (or not known to be) trained on virials."""


class DPCalculator(Calculator):
    """ASE calculator around a trained :class:`~rlekf.models.DeepPotential`.

    Prefer :meth:`from_checkpoint` or :meth:`from_file`.

    Args:
        model: a :class:`DeepPotential`, or the module of an exported file (see
            :func:`rlekf.export.load_exported`); both are called as ``model(batch, forces,
            virial)``.
        type_map: element symbols in type order.
        rcut: cutoff (Å).
        sel: neighbour slots per type.
        dtype: float dtype of the model.
        device: torch device to run on.
        trained_on_virials: whether the model was fitted to virial labels (``None``: unknown).
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator`.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]

    def __init__(
        self,
        model: DeepPotential | torch.nn.Module,
        *,
        type_map: Sequence[str],
        rcut: float,
        sel: Sequence[int],
        dtype: str | torch.dtype = "float64",
        device: str | torch.device = "cpu",
        trained_on_virials: bool | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.trained_on_virials = trained_on_virials
        self._stress_warned = False
        self.uncertainty = None  # a KalmanUncertainty: from_checkpoint(..., uncertainty=True)
        self.model = model
        self.type_map = list(type_map)
        self.rcut = float(rcut)
        self.sel = [int(s) for s in sel]
        self.dtype = resolve_dtype(dtype)
        self.device = torch.device(device)
        self.converter = AtomsConverter(self.type_map, self.rcut, self.sel, self.dtype, device)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_checkpoint(
        cls,
        path: PathLike,
        device: str | torch.device = "cpu",
        *,
        trust_checkpoint: bool = False,
        uncertainty: bool = False,
        force_estimator: str | None = None,
        **kwargs: Any,
    ) -> DPCalculator:
        """Calculator from a Lightning checkpoint written by ``rlekf-train``.

        The file is read with ``weights_only=True`` (no code from the file runs); set
        ``trust_checkpoint=True`` only for a file of trusted origin that needs full unpickling.

        With ``uncertainty=True`` (an RLEKF checkpoint) every calculation also fills
        ``results["energy_std"]`` (eV, total energy) and ``results["forces_std"]`` ((n,) eV/Å,
        per atom) from the Kalman covariance ``P`` (:mod:`rlekf.uncertainty`), calibrated by
        the checkpoint's sidecar ``<checkpoint>.uncertainty.json`` (raw scale of ``P`` and an
        ``UncalibratedWarning`` without one); ``force_estimator`` (``"exact"``: 3n gradients,
        ``"signed"``: n) defaults to the calibration's.

        Raises:
            ValueError: not an rlekf checkpoint, or one that needs full unpickling without
                ``trust_checkpoint`` (see :func:`rlekf.export.load_checkpoint`).
            rlekf.uncertainty.NoCovarianceError: ``uncertainty=True`` and the checkpoint holds
                no ``P`` (trained with Adam).
        """
        model, config, info = load_checkpoint_with_info(
            path, device, trust_checkpoint=trust_checkpoint
        )
        kalman = None
        if uncertainty:
            from rlekf.uncertainty import KalmanUncertainty

            kalman = KalmanUncertainty.from_checkpoint(
                path, model, force_estimator=force_estimator, trust_checkpoint=trust_checkpoint
            )
        calc = cls.from_loaded(model, config, info, device=device, **kwargs)
        calc.uncertainty = kalman
        return calc

    @classmethod
    def from_loaded(
        cls, model, config: dict, info: dict, device: str = "cpu", **kwargs: Any
    ) -> DPCalculator:
        """A calculator for a model already loaded by
        :func:`rlekf.export.load_checkpoint_with_info` (its ``model, config, info``)."""
        return cls(
            model,
            type_map=config["type_map"],
            rcut=config["rcut"],
            sel=config["sel"],
            dtype=model.dtype,
            device=device,
            trained_on_virials=info["trained_on_virials"],
            **kwargs,
        )

    @classmethod
    def from_file(
        cls, path: PathLike, device: str | torch.device = "cpu", **kwargs: Any
    ) -> DPCalculator:
        """Calculator from a TorchScript file written by ``rlekf-export``.

        Raises:
            ValueError: not an rlekf export, or another format version.
        """
        module, meta = load_exported(path, device)
        return cls(
            module,
            type_map=meta["type_map"],
            rcut=meta["rcut"],
            sel=meta["sel"],
            dtype=meta["dtype"],
            device=device,
            trained_on_virials=meta.get("trained_on_virials"),
            **kwargs,
        )

    # ------------------------------------------------------------------ evaluation
    def calculate(
        self,
        atoms: Any = None,
        properties: Sequence[str] = ("energy",),
        system_changes: Sequence[str] = all_changes,
    ) -> None:
        """Compute energy, per-atom energies, forces and (periodic cells) stress.

        Raises:
            UnknownElementError: an element is not in the type map.
            NeighborOverflowError: an atom has more neighbours of a type than ``sel`` slots.
        """
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        batch = self.converter(atoms)
        cell = np.asarray(atoms.get_cell())
        volume = abs(float(np.linalg.det(cell))) if atoms.get_pbc().all() else 0.0
        want_stress = "stress" in properties and volume > 1e-12
        with torch.enable_grad():  # the model, scripted or not, takes the same call
            out = self.model(batch, forces=True, virial=want_stress)
        energy = float(out[K.ENERGY].detach()[0])
        self.results["energy"] = energy
        self.results["free_energy"] = energy
        self.results["energies"] = out[K.ATOM_ENERGY].detach().cpu().double().numpy()
        self.results["forces"] = out[K.FORCES].detach().cpu().double().numpy()
        if self.uncertainty is not None:
            std = self.uncertainty(batch, forces=True)
            self.results["energy_std"] = float(std["energy_std"][0])
            self.results["forces_std"] = std["forces_std"]
        if want_stress:
            if self.trained_on_virials is not True and not self._stress_warned:
                self._stress_warned = True
                known = "was not" if self.trained_on_virials is False else "is not known to be"
                warnings.warn(
                    f"this model {known} trained on virials: its stress is the exact strain "
                    "derivative of its energy, but its accuracy against DFT is untested "
                    "(train with optim.updater.train_virial=true on data with virials)",
                    StressNotTrainedWarning,
                    stacklevel=2,
                )
            virial = out[K.VIRIAL].detach().cpu().double().numpy()[0]
            stress = -0.5 * (virial + virial.T) / volume
            self.results["stress"] = full_3x3_to_voigt_6_stress(stress)
