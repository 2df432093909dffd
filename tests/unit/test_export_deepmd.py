"""``rlekf-export --format deepmd``: DeePMD-kit 3.2's model format, without DeePMD-kit.

The exported file is checked three ways: its arrays against the checkpoint's tensors (read
with h5py/yaml directly, not with our reader); its energies against an independent numpy
evaluation of DeePMD-kit's se_e2_a formulas on the file alone (network list order, skip and
timestep rules, davg/dstd per slot, out_bias); and a round trip back into DeepPotential. The
comparison with DeePMD-kit itself is in tests/interop (``make test-interop``).
"""

from __future__ import annotations

import itertools
import json

import h5py
import numpy as np
import pytest
import torch
import yaml

from rlekf import keys as K
from rlekf.export import main as export_main
from rlekf.interop.deepmd import (
    DEEPMD_KIT_VERSION,
    DeepmdFormatError,
    export_deepmd,
    from_deepmd,
    read_deepmd,
    to_deepmd,
    write_deepmd,
)
from tests.helpers.frames import cu_frame, model_and_batch, water_like_frame

WATER_SEL = [20, 40]


def _trained_like(model, bias):
    """Give the output layers and the bias non-zero values (a fresh model has them at 0)."""
    with torch.no_grad():
        for fit in model.fittings:
            fit.layers[-1].bias.normal_(0.0, 0.3)
        model.energy_bias.copy_(torch.as_tensor(bias, dtype=torch.float64))
    return model


@pytest.fixture(scope="module")
def water():
    frames = [water_like_frame(seed=s) for s in (1, 2)]
    model, batch = model_and_batch(
        frames, ["O", "H"], WATER_SEL, rcut=4.0, embedding=[8, 16], fitting=[16, 16],
        axis_neuron=4,
    )  # fmt: skip
    return _trained_like(model, [-93.2, -187.1]), batch, frames


@pytest.fixture(scope="module")
def water_one_side():
    frames = [water_like_frame(seed=3)]
    model, batch = model_and_batch(
        frames, ["O", "H"], WATER_SEL, rcut=4.0, embedding=[2, 4, 8], fitting=[8],
        axis_neuron=2, type_one_side=True, resnet_dt=False, seed=1,
    )  # fmt: skip
    return _trained_like(model, [-3.0, -1.5]), batch, frames


def _checkpoint(model, path):
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": dict(model.config)}, path)
    return state


# ------------------------------------------------------------------ file vs checkpoint
def _read_h5(path):
    """The .dp file decoded by hand: JSON attribute, each '/variable_NNNN' a dataset."""
    with h5py.File(path, "r") as f:
        data = json.loads(f.attrs["json"])
        arrays = {name: f[name][()] for name in f.keys()}
    return data, {"/" + k: v for k, v in arrays.items()}


def test_dp_file_holds_the_checkpoint_tensors(water, tmp_path):
    model, _, _ = water
    state = _checkpoint(model, tmp_path / "m.ckpt")
    assert export_main([str(tmp_path / "m.ckpt"), "--format", "deepmd"]) == 0
    data, arrays = _read_h5(tmp_path / "m.dp")
    m = data["model"]
    nt = 2
    d = m["descriptor"]
    assert (m["@class"], m["type"], m["@version"]) == ("Model", "standard", 2)
    assert (d["type"], d["@version"], d["precision"]) == ("se_e2_a", 2, "float64")
    assert (d["rcut"], d["rcut_smth"], d["sel"]) == (4.0, model.rcut_smth, WATER_SEL)
    assert (d["neuron"], d["axis_neuron"], d["type_one_side"]) == ([8, 16], 4, False)
    assert m["type_map"] == d["type_map"] == m["fitting"]["type_map"] == ["O", "H"]
    assert data["model_def_script"]["descriptor"]["sel"] == WATER_SEL
    davg, dstd = arrays[d["@variables"]["davg"]], arrays[d["@variables"]["dstd"]]
    assert davg.shape == dstd.shape == (nt, sum(WATER_SEL), 4)
    for t in range(nt):
        np.testing.assert_array_equal(davg[t], np.tile(state["model.env_avg"][t], (60, 1)))
        np.testing.assert_array_equal(dstd[t], np.tile(state["model.env_std"][t], (60, 1)))
    out_bias = arrays[m["@variables"]["out_bias"]]
    assert out_bias.dtype == np.float64
    np.testing.assert_array_equal(out_bias.reshape(nt), state["model.energy_bias"])
    assert not arrays[m["fitting"]["@variables"]["bias_atom_e"]].any()
    # embedding net for (centre i, neighbour j) at DeePMD-kit position i + j * ntypes
    nets = d["embeddings"]["networks"]
    for i, j in itertools.product(range(nt), repeat=2):
        layers = nets[i + j * nt]["layers"]
        for li, layer in enumerate(layers):
            ours = f"model.embeddings.{i * nt + j}.layers.{li}"
            var = layer["@variables"]
            np.testing.assert_array_equal(arrays[var["w"]], state[f"{ours}.weight"])
            np.testing.assert_array_equal(arrays[var["b"]], state[f"{ours}.bias"])
            assert var["idt"] is None and layer["activation_function"] == "tanh"
    for t, net in enumerate(m["fitting"]["nets"]["networks"]):
        layers = net["layers"]
        assert len(layers) == 3 and layers[-1]["activation_function"] == "none"
        for li, layer in enumerate(layers):
            ours = f"model.fittings.{t}.layers.{li}"
            var = layer["@variables"]
            np.testing.assert_array_equal(arrays[var["w"]], state[f"{ours}.weight"])
            np.testing.assert_array_equal(arrays[var["b"]], state[f"{ours}.bias"])
            if f"{ours}.timestep" in state:
                np.testing.assert_array_equal(arrays[var["idt"]], state[f"{ours}.timestep"])
            else:
                assert var["idt"] is None
        assert [layer["@variables"]["idt"] is not None for layer in layers] == [0, 1, 0]


def test_yaml_file_equals_the_dp_file(water, tmp_path):
    model, _, _ = water
    write_deepmd(to_deepmd(model), tmp_path / "m.dp")
    write_deepmd(to_deepmd(model), tmp_path / "m.yaml")
    data, arrays = _read_h5(tmp_path / "m.dp")
    with open(tmp_path / "m.yaml") as f:
        plain = yaml.safe_load(f)

    def compare(a, b):
        if isinstance(a, dict) and a.get("@class") == "np.ndarray":
            np.testing.assert_array_equal(np.asarray(a["value"], dtype=a["dtype"]), arrays[b])
        elif isinstance(a, dict):
            assert sorted(a) == sorted(b)
            for k in a:
                if k != "time":
                    compare(a[k], b[k])
        elif isinstance(a, list):
            assert len(a) == len(b)
            for x, y in zip(a, b, strict=True):
                compare(x, y)
        else:
            assert a == b

    compare(plain, data)


# ------------------------------------------------------------------ independent evaluation
def _dense(x, layer):
    """DeePMD-kit's layer: y = act(x w + b) [* idt] [+ x or [x, x] when resnet]."""
    var = layer["@variables"]
    y = x @ var["w"] + var["b"]
    if layer["activation_function"] == "tanh":
        y = np.tanh(y)
    if var["idt"] is not None:
        y = y * var["idt"]
    if layer["resnet"] and y.shape[-1] == x.shape[-1]:
        y = y + x
    elif layer["resnet"] and y.shape[-1] == 2 * x.shape[-1]:
        y = y + np.concatenate([x, x], axis=-1)
    return y


def _net(x, net):
    for layer in net["layers"]:
        x = _dense(x, layer)
    return x


def _reference_atom_energies(m, frame, types):
    """se_e2_a atomic energies from a DeePMD-kit model dict, brute force over cell images."""
    d, fit = m["descriptor"], m["fitting"]
    rcut, rs, sel = d["rcut"], d["rcut_smth"], d["sel"]
    nt, nnei = len(sel), sum(sel)
    davg, dstd = d["@variables"]["davg"], d["@variables"]["dstd"]
    pos, cell = frame.positions, frame.cell
    images = [np.array(s) @ cell for s in itertools.product(range(-2, 3), repeat=3)]
    out = np.zeros(len(pos))
    for i in range(len(pos)):
        gr = np.zeros((d["neuron"][-1], 4))
        for tj in range(nt):
            rows = []
            for j in np.nonzero(types == tj)[0]:
                for shift in images:
                    v = pos[j] + shift - pos[i]
                    r = np.linalg.norm(v)
                    if 1e-8 < r < rcut:
                        u = min(max((r - rs) / (rcut - rs), 0.0), 1.0)
                        s = (u**3 * (-6 * u**2 + 15 * u - 10) + 1) / r
                        rows.append(np.concatenate([[s], s * v / r]))
            assert len(rows) <= sel[tj]
            rows += [np.zeros(4)] * (sel[tj] - len(rows))  # empty slots: zero before the shift
            start = sum(sel[:tj])
            env = (np.array(rows) - davg[types[i], start : start + sel[tj]]) / dstd[
                types[i], start : start + sel[tj]
            ]
            net = d["embeddings"]["networks"][tj if d["type_one_side"] else types[i] + tj * nt]
            gr += _net(env[:, :1], net).T @ env
        gr /= nnei
        desc = (gr @ gr[: d["axis_neuron"]].T).reshape(-1)
        e = _net(desc, fit["nets"]["networks"][types[i]])[0]
        out[i] = e + fit["@variables"]["bias_atom_e"][types[i], 0]
        out[i] += m["@variables"]["out_bias"][0, types[i], 0]
    return out


@pytest.mark.parametrize("case", ["water", "water_one_side"])
def test_exported_dict_evaluates_to_the_model_energies(case, request):
    model, batch, frames = request.getfixturevalue(case)
    m = to_deepmd(model)["model"]
    with torch.no_grad():
        ours = model(batch, forces=False)[K.ATOM_ENERGY].numpy()
    start = 0
    for frame in frames:
        types = np.where(frame.numbers == 8, 0, 1)
        ref = _reference_atom_energies(m, frame, types)
        np.testing.assert_allclose(ours[start : start + len(ref)], ref, rtol=1e-12, atol=1e-10)
        start += len(ref)


# ------------------------------------------------------------------ round trip
@pytest.mark.parametrize(
    "case, suffix", [("water", ".dp"), ("water", ".yaml"), ("water_one_side", ".dp")]
)
def test_round_trip_gives_the_same_energies_forces_virials(case, suffix, request, tmp_path):
    model, batch, _ = request.getfixturevalue(case)
    path = write_deepmd(to_deepmd(model), tmp_path / f"m{suffix}")
    back = from_deepmd(read_deepmd(path), where=str(path))
    assert back.config == model.config
    a = model(batch, forces=True, virial=True)
    b = back(batch, forces=True, virial=True)
    for key in (K.ENERGY, K.ATOM_ENERGY, K.FORCES, K.VIRIAL):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-10)
    torch.testing.assert_close(back.energy_bias, model.energy_bias, rtol=0, atol=0)


def test_round_trip_of_a_cu_checkpoint(tmp_path):
    frame = cu_frame(size=2, seed=4)
    model, batch = model_and_batch([frame], ["Cu"], [60], rcut=5.0, embedding=[4, 8, 16],
                                   fitting=[8, 8], axis_neuron=4)  # fmt: skip
    _checkpoint(_trained_like(model, [-4.1]), tmp_path / "cu.ckpt")
    path = export_deepmd(tmp_path / "cu.ckpt", tmp_path / "cu.dp")
    data = read_deepmd(path)
    assert data["rlekf"]["source"] == str(tmp_path / "cu.ckpt")
    assert data["deepmd_kit_format"] == DEEPMD_KIT_VERSION
    back = from_deepmd(data)
    a, b = model(batch, virial=True), back(batch, virial=True)
    for key in (K.ENERGY, K.FORCES, K.VIRIAL):
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-10)


# ------------------------------------------------------------------ refusals
def test_other_format_versions_are_refused(water):
    model, _, _ = water
    data = to_deepmd(model)
    data["model"]["descriptor"]["@version"] = 3
    with pytest.raises(DeepmdFormatError, match=f"DeePMD-kit {DEEPMD_KIT_VERSION}"):
        from_deepmd(data, where="x.dp")
    data = to_deepmd(model)
    data["model"]["fitting"]["nets"]["networks"][0]["layers"][0]["@version"] = 1
    with pytest.raises(DeepmdFormatError, match="Layer is in format version 1"):
        from_deepmd(data, where="x.dp")


@pytest.mark.parametrize(
    "edit, what",
    [
        (lambda m: m["descriptor"].update(exclude_types=[[0, 1]]), "exclude_types"),
        (lambda m: m["descriptor"].update(type="se_e2_r"), "descriptor type"),
        (lambda m: m["fitting"].update(numb_fparam=2), "numb_fparam"),
        (lambda m: m["descriptor"].update(activation_function="gelu"), "activation gelu"),
        (lambda m: m["descriptor"].update(compress={}), "compressed"),
    ],
)
def test_features_without_counterpart_are_refused(water, edit, what):
    model, _, _ = water
    data = to_deepmd(model)
    edit(data["model"])
    with pytest.raises(DeepmdFormatError, match=what):
        from_deepmd(data, where="x.dp")


def test_untrained_model_and_bad_suffix_are_refused(tmp_path):
    from rlekf.models import DeepPotential

    with pytest.raises(DeepmdFormatError, match="stats_fitted"):
        to_deepmd(DeepPotential(["Cu"], sel=[4], embedding=[2, 4], fitting=[4], axis_neuron=2))
    with pytest.raises(DeepmdFormatError, match=r"\.dp \(HDF5\) or \.yaml"):
        write_deepmd({}, tmp_path / "m.pb")


def test_export_cli_default_stays_torchscript(water, tmp_path, capsys):
    model, _, _ = water
    _checkpoint(model, tmp_path / "m.ckpt")
    assert export_main([str(tmp_path / "m.ckpt")]) == 0
    assert (tmp_path / "m.pt").is_file() and not (tmp_path / "m.dp").exists()
    assert export_main([str(tmp_path / "m.ckpt"), "--format", "deepmd", "-o", "x.txt"]) == 1
    assert "or .yaml" in capsys.readouterr().err
