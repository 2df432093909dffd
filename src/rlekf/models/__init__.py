"""Deep Potential models (plain ``nn.Module``; no Hydra)."""

from rlekf.models.deep_potential import DeepPotential

__all__ = ["DeepPotential"]
