"""Weight-initialisation schemes for :class:`~rlekf.models.DeepPotential`.

Each scheme is a plain function ``scheme(model, **kwargs)`` that re-initialises every
:class:`~rlekf.models.deep_potential.Dense` layer in place; Hydra configs under
``configs/model/init/`` bind the keyword arguments with ``_partial_: true``. ``scale``
multiplies the weights (and, where random, the biases) of every scheme, so sweeps can test the
paper's claim that RLEKF is insensitive to initialisation. Timestep vectors are always
N(0.1, 0.001) as in DeePMD-kit; the output-layer bias always starts at 0.

Weights are stored as (n_in, n_out), so fan-in is ``shape[0]``; torch's initialisers are applied
to the transposed view, which has torch's (n_out, n_in) layout.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from rlekf.models.deep_potential import Dense

__all__ = [
    "SCHEMES",
    "deepmd",
    "kaiming_normal",
    "kaiming_uniform",
    "normal",
    "torch_default",
    "xavier_normal",
    "xavier_uniform",
]


def _dense_layers(model: nn.Module) -> Iterator[Dense]:
    for module in model.modules():
        if isinstance(module, Dense):
            yield module


def _finish(layer: Dense, scale: float) -> None:
    layer.weight.mul_(scale)
    if not layer.activation:
        # output layer: the per-element energy bias buffer carries the shift, so the bias
        # starts at 0 (a large initial energy error would make the first Kalman step huge)
        layer.bias.zero_()
    if layer.timestep is not None:
        layer.timestep.normal_(0.1, 0.001)


@torch.no_grad()
def deepmd(model: nn.Module, scale: float = 1.0) -> None:
    """DeePMD-kit: W ~ N(0, 1/(n_in+n_out)), b ~ N(0, 1) (both times ``scale``)."""
    for layer in _dense_layers(model):
        layer.weight.normal_(0.0, 1.0 / math.sqrt(layer.n_in + layer.n_out))
        layer.bias.normal_(0.0, scale)
        _finish(layer, scale)


@torch.no_grad()
def torch_default(model: nn.Module, scale: float = 1.0) -> None:
    """``nn.Linear``'s default: kaiming-uniform(a=√5) weights, U(±1/√fan_in) biases."""
    for layer in _dense_layers(model):
        nn.init.kaiming_uniform_(layer.weight.T, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(layer.n_in)
        layer.bias.uniform_(-bound * scale, bound * scale)
        _finish(layer, scale)


@torch.no_grad()
def xavier_uniform(model: nn.Module, gain: float = 1.0, scale: float = 1.0) -> None:
    """Glorot uniform weights, zero biases."""
    for layer in _dense_layers(model):
        nn.init.xavier_uniform_(layer.weight.T, gain=gain)
        layer.bias.zero_()
        _finish(layer, scale)


@torch.no_grad()
def xavier_normal(model: nn.Module, gain: float = 1.0, scale: float = 1.0) -> None:
    """Glorot normal weights, zero biases."""
    for layer in _dense_layers(model):
        nn.init.xavier_normal_(layer.weight.T, gain=gain)
        layer.bias.zero_()
        _finish(layer, scale)


@torch.no_grad()
def kaiming_uniform(model: nn.Module, scale: float = 1.0) -> None:
    """He uniform weights (fan-in, tanh gain 5/3), zero biases."""
    for layer in _dense_layers(model):
        nn.init.kaiming_uniform_(layer.weight.T, nonlinearity="tanh")
        layer.bias.zero_()
        _finish(layer, scale)


@torch.no_grad()
def kaiming_normal(model: nn.Module, scale: float = 1.0) -> None:
    """He normal weights (fan-in, tanh gain 5/3), zero biases."""
    for layer in _dense_layers(model):
        nn.init.kaiming_normal_(layer.weight.T, nonlinearity="tanh")
        layer.bias.zero_()
        _finish(layer, scale)


@torch.no_grad()
def normal(model: nn.Module, std: float = 0.1, scale: float = 1.0) -> None:
    """All weights and biases N(0, std²)."""
    for layer in _dense_layers(model):
        layer.weight.normal_(0.0, std)
        layer.bias.normal_(0.0, std * scale)
        _finish(layer, scale)


SCHEMES: dict[str, Callable[..., None]] = {
    "deepmd": deepmd,
    "torch_default": torch_default,
    "xavier_uniform": xavier_uniform,
    "xavier_normal": xavier_normal,
    "kaiming_uniform": kaiming_uniform,
    "kaiming_normal": kaiming_normal,
    "normal": normal,
}
