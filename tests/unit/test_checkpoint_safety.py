"""A checkpoint never runs code unless the user says so (``trust_checkpoint``)."""

from __future__ import annotations

import builtins

import pytest
import torch

from rlekf.calculator import DPCalculator
from rlekf.export import UntrustedCheckpointError, export_model, load_checkpoint
from rlekf.md import load_calculator
from rlekf.models import DeepPotential


class _CreatesFile:
    """Unpickling this object opens (creates) ``path``: a stand-in for arbitrary code."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (builtins.open, (self.path, "w"))


def _model() -> DeepPotential:
    model = DeepPotential(["Cu"], sel=[20], embedding=[4, 8], fitting=[8], axis_neuron=2)
    model.set_statistics({"env_avg": [[0.0] * 4], "env_std": [[1.0] * 4], "energy_bias": [0.0]})
    return model


def _crafted(tmp_path):
    """A valid rlekf checkpoint with a payload that creates ``tmp_path/pwned`` on unpickling."""
    model = _model()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    marker = tmp_path / "pwned"
    ckpt = {"state_dict": state, "model_config": dict(model.config)}
    ckpt["payload"] = _CreatesFile(marker)
    torch.save(ckpt, tmp_path / "crafted.ckpt")
    return tmp_path / "crafted.ckpt", marker


def test_crafted_pickle_is_refused_by_default_and_runs_nothing(tmp_path):
    path, marker = _crafted(tmp_path)
    for load in (
        lambda: load_checkpoint(path),
        lambda: DPCalculator.from_checkpoint(path),
        lambda: export_model(path, tmp_path / "out.pt"),
        lambda: load_calculator(path),
    ):
        with pytest.raises(UntrustedCheckpointError, match=r"(?s)io\.open.*trust_checkpoint"):
            load()
        assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()


def test_trust_checkpoint_unpickles_in_full(tmp_path):
    path, marker = _crafted(tmp_path)
    model, config = load_checkpoint(path, trust_checkpoint=True)
    assert marker.exists()  # the payload ran: the option really is full unpickling
    assert config["type_map"] == ["Cu"] and isinstance(model, DeepPotential)


def test_plain_rlekf_checkpoint_loads_without_trust(tmp_path):
    model = _model()
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": dict(model.config)}, tmp_path / "ok.ckpt")
    torch.load(tmp_path / "ok.ckpt", weights_only=True)
    loaded, _ = load_checkpoint(tmp_path / "ok.ckpt")
    assert torch.equal(loaded.energy_bias, model.energy_bias)
