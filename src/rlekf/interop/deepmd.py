"""A trained :class:`~rlekf.models.DeepPotential` in DeePMD-kit's own model format.

DeePMD-kit (3.x) saves any model backend-independently as nested dictionaries of settings and
arrays, in an HDF5 file (``.dp``: the dictionary as JSON in the file's ``json`` attribute, every
array a dataset ``/variable_NNNN`` named in its place) or in YAML (``.yaml``: arrays inline as
``{"@class": "np.ndarray", "dtype": ..., "value": [...]}``). From such a file DeePMD-kit's tools
take over: ``dp test -m model.dp``, ``dp convert-backend model.dp model.pth`` (its PyTorch
backend), then LAMMPS with ``pair_style deepmd model.pth``.

The model here is the same se_e2_a energy model as DeePMD-kit's, so the translation copies
numbers; the correspondence, object by object (DeePMD-kit 3.2's names on the left):

* ``descriptor`` (se_e2_a): ``rcut``, ``rcut_smth``, ``sel``, ``neuron`` = embedding widths,
  ``axis_neuron``, ``type_one_side``, ``precision`` = model dtype, ``activation_function`` =
  tanh, ``resnet_dt`` = false (embedding layers have no timestep), ``env_protection`` = 0;
  ``davg``/``dstd`` (ntypes, sum(sel), 4) = ``env_avg``/``env_std`` (ntypes, 4) repeated over
  the neighbour slots (both computed as DeePMD-kit's EnvMatStatSe does).
* ``embeddings``: a collection of ntypes² networks (ntypes with ``type_one_side``); DeePMD-kit's
  network for (centre type i, neighbour type j) sits at list position ``i + j * ntypes``, ours
  at ``i * ntypes + j``.
* ``fitting`` (ener): one network per element, ``neuron`` = fitting widths, ``resnet_dt``;
  ``bias_atom_e`` = 0.
* ``out_bias`` (1, ntypes, 1) of the atomic model = ``energy_bias`` (float64 in both codes).
* every layer: ``w`` (n_in, n_out) = ``weight``, ``b`` = ``bias``, ``idt`` = ``timestep`` (or
  none), ``resnet`` says whether the layer adds its input (x, or [x, x] when the width
  doubles); our first layer of each network never does, so it is written ``resnet: false``
  where its widths would otherwise make DeePMD-kit add a skip.

Both codes compute E_i = F_t(D_i) + bias_t with the same D_i (descriptor divided by sum(sel)),
so energies, forces and virials agree to rounding. The format written and read is that of
DeePMD-kit 3.2 (:data:`DEEPMD_KIT_VERSION`): the ``@version`` of each object in
:data:`OBJECT_VERSIONS`. A file whose objects carry other versions is refused with a message;
so are features with no counterpart here (excluded types, compression, frame/atomic parameters,
type embedding, activations other than tanh, ...).

Units as in both codes: Å, eV, eV/Å, virial in eV.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlekf.models.deep_potential import DeepPotential, Dense

__all__ = [
    "DEEPMD_KIT_VERSION",
    "OBJECT_VERSIONS",
    "SUFFIXES",
    "DeepmdFormatError",
    "export_deepmd",
    "from_deepmd",
    "model_def_script",
    "read_deepmd",
    "to_deepmd",
    "to_deepmd_model",
    "write_deepmd",
]

#: The DeePMD-kit release whose serialization this module writes and was verified against.
DEEPMD_KIT_VERSION: str = "3.2.0"

#: ``@version`` of each serialized object (by ``@class``) in DeePMD-kit 3.2.
OBJECT_VERSIONS: dict[str, int] = {
    "Model": 2,
    "Descriptor": 2,
    "Fitting": 4,
    "NetworkCollection": 1,
    "EmbeddingNetwork": 2,
    "FittingNetwork": 1,
    "Layer": 2,
    "np.ndarray": 1,
}

#: File suffixes of DeePMD-kit's backend-independent format.
SUFFIXES: tuple[str, ...] = (".dp", ".yaml", ".yml")

PathLike = str | os.PathLike

_ACTIVATION = "tanh"


class DeepmdFormatError(ValueError):
    """A DeePMD-kit model dictionary that this module cannot translate."""


def _precision(model: DeepPotential) -> str:
    return str(model.dtype).replace("torch.", "")


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


# ------------------------------------------------------------------------------ rlekf -> dict
def _layer(dense: Dense, *, first: bool, precision: str) -> dict[str, Any]:
    """One :class:`Dense` as a DeePMD-kit ``Layer``."""
    widths_skip = dense.n_out in (dense.n_in, 2 * dense.n_in)
    if not dense.activation:
        resnet = False
    elif first:
        # DeePMD-kit's networks mark every hidden layer resnet; ours never skips in the first
        resnet = not widths_skip
    else:
        resnet = True
    assert resnet == dense.resnet or not widths_skip
    timestep = dense.timestep
    return {
        "@class": "Layer",
        "@version": OBJECT_VERSIONS["Layer"],
        "bias": True,
        "use_timestep": timestep is not None,
        "activation_function": _ACTIVATION if dense.activation else "none",
        "resnet": resnet,
        "precision": precision,
        "trainable": True,
        "@variables": {
            "w": _array(dense.weight),
            "b": _array(dense.bias),
            "idt": None if timestep is None else _array(timestep),
        },
    }


def _collection(ndim: int, ntypes: int, kind: str, networks: list[dict]) -> dict[str, Any]:
    return {
        "@class": "NetworkCollection",
        "@version": OBJECT_VERSIONS["NetworkCollection"],
        "ndim": ndim,
        "ntypes": ntypes,
        "network_type": kind,
        "networks": networks,
    }


def _embedding_index(k: int, ntypes: int, type_one_side: bool) -> int:
    """DeePMD-kit's list position of our embedding net ``k`` (see the module docstring)."""
    if type_one_side:
        return k
    centre, neighbour = divmod(k, ntypes)
    return centre + neighbour * ntypes


def to_deepmd_model(model: DeepPotential) -> dict[str, Any]:
    """The ``model`` object of DeePMD-kit 3.2's serialization (a standard energy model).

    Args:
        model: a :class:`DeepPotential` with fitted statistics.

    Returns:
        Nested dictionaries of plain settings and numpy arrays (weights in the model dtype, the
        energy bias in float64).
    """
    if not bool(model.stats_fitted):
        raise DeepmdFormatError(
            "the model has no descriptor statistics / energy bias (stats_fitted is false): "
            "export a trained model"
        )
    cfg = model.config
    nt = model.ntypes
    prec = _precision(model)
    embedding, fitting = list(cfg["embedding"]), list(cfg["fitting"])
    nnei = int(sum(model.sel))
    emb_nets: list[dict | None] = [None] * len(model.embeddings)
    for k, net in enumerate(model.embeddings):
        emb_nets[_embedding_index(k, nt, model.type_one_side)] = {
            "@class": "EmbeddingNetwork",
            "@version": OBJECT_VERSIONS["EmbeddingNetwork"],
            "in_dim": 1,
            "neuron": embedding,
            "activation_function": _ACTIVATION,
            "resnet_dt": False,
            "bias": True,
            "precision": prec,
            "layers": [
                _layer(layer, first=i == 0, precision=prec) for i, layer in enumerate(net.layers)
            ],
        }
    n_desc = embedding[-1] * model.axis_neuron
    fit_nets = [
        {
            "@class": "FittingNetwork",
            "@version": OBJECT_VERSIONS["FittingNetwork"],
            "in_dim": n_desc,
            "out_dim": 1,
            "neuron": fitting,
            "activation_function": _ACTIVATION,
            "resnet_dt": bool(cfg["resnet_dt"]),
            "precision": prec,
            "bias_out": True,
            "layers": [
                _layer(layer, first=i == 0, precision=prec) for i, layer in enumerate(net.layers)
            ],
        }
        for net in model.fittings
    ]
    env_avg = _array(model.env_avg)
    env_std = _array(model.env_std)
    descriptor = {
        "@class": "Descriptor",
        "type": "se_e2_a",
        "@version": OBJECT_VERSIONS["Descriptor"],
        "rcut": float(model.rcut),
        "rcut_smth": float(model.rcut_smth),
        "sel": [int(s) for s in model.sel],
        "neuron": embedding,
        "axis_neuron": int(model.axis_neuron),
        "resnet_dt": False,
        "trainable": True,
        "type_one_side": bool(model.type_one_side),
        "exclude_types": [],
        "env_protection": 0.0,
        "set_davg_zero": False,
        "activation_function": _ACTIVATION,
        "precision": prec,
        "spin": None,
        "env_mat": {
            "rcut": float(model.rcut),
            "rcut_smth": float(model.rcut_smth),
            "protection": 0.0,
            "use_exp_switch": False,
        },
        "embeddings": _collection(
            1 if model.type_one_side else 2, nt, "embedding_network", emb_nets
        ),
        "@variables": {
            "davg": np.repeat(env_avg[:, None, :], nnei, axis=1),
            "dstd": np.repeat(env_std[:, None, :], nnei, axis=1),
        },
        "type_map": list(model.type_map),
    }
    fitting_obj = {
        "@class": "Fitting",
        "@version": OBJECT_VERSIONS["Fitting"],
        "type": "ener",
        "var_name": "energy",
        "ntypes": nt,
        "dim_descrpt": n_desc,
        "neuron": fitting,
        "resnet_dt": bool(cfg["resnet_dt"]),
        "numb_fparam": 0,
        "numb_aparam": 0,
        "dim_case_embd": 0,
        "default_fparam": None,
        "rcond": None,
        "activation_function": _ACTIVATION,
        "precision": prec,
        "mixed_types": False,
        "exclude_types": [],
        "nets": _collection(1, nt, "fitting_network", fit_nets),
        "@variables": {
            "bias_atom_e": np.zeros((nt, 1), dtype=np.float64),
            "case_embd": None,
            "fparam_avg": None,
            "fparam_inv_std": None,
            "aparam_avg": None,
            "aparam_inv_std": None,
        },
        "type_map": list(model.type_map),
        "tot_ener_zero": False,
        "trainable": [True] * (len(fitting) + 1),
        "layer_name": None,
        "use_aparam_as_mask": False,
        "spin": None,
        "dim_out": 1,
        "atom_ener": None,
    }
    bias = _array(model.energy_bias).astype(np.float64)
    return {
        "@class": "Model",
        "type": "standard",
        "@version": OBJECT_VERSIONS["Model"],
        "type_map": list(model.type_map),
        "descriptor": descriptor,
        "fitting": fitting_obj,
        "atom_exclude_types": [],
        "pair_exclude_types": [],
        "rcond": None,
        "preset_out_bias": None,
        "@variables": {
            "out_bias": bias.reshape(1, nt, 1),
            "out_std": np.ones((1, nt, 1), dtype=np.float64),
        },
    }


def model_def_script(model: DeepPotential) -> dict[str, Any]:
    """The ``model`` section of a DeePMD-kit training input that builds the same network.

    DeePMD-kit keeps it beside the weights (``model_def_script``) and rebuilds a ``.pth`` model
    from it when converting back.
    """
    cfg = model.config
    prec = _precision(model)
    return {
        "type_map": list(model.type_map),
        "descriptor": {
            "type": "se_e2_a",
            "sel": [int(s) for s in model.sel],
            "rcut_smth": float(model.rcut_smth),
            "rcut": float(model.rcut),
            "neuron": list(cfg["embedding"]),
            "axis_neuron": int(model.axis_neuron),
            "resnet_dt": False,
            "type_one_side": bool(model.type_one_side),
            "activation_function": _ACTIVATION,
            "precision": prec,
        },
        "fitting_net": {
            "type": "ener",
            "neuron": list(cfg["fitting"]),
            "resnet_dt": bool(cfg["resnet_dt"]),
            "activation_function": _ACTIVATION,
            "precision": prec,
        },
    }


def to_deepmd(model: DeepPotential, *, source: str = "<memory>") -> dict[str, Any]:
    """The whole file content: ``model``, ``model_def_script`` and provenance.

    Args:
        model: a trained :class:`DeepPotential`.
        source: where the model came from (a checkpoint path), recorded under ``rlekf``.
    """
    from rlekf import __version__

    return {
        "software": "rlekf",
        "version": __version__,
        "time": str(datetime.datetime.now(tz=datetime.timezone.utc)),
        "backend": "rlekf",
        "deepmd_kit_format": DEEPMD_KIT_VERSION,
        "model": to_deepmd_model(model),
        "model_def_script": model_def_script(model),
        "@variables": {},
        "rlekf": {"source": source, "model_config": json.loads(json.dumps(model.config))},
    }


# ------------------------------------------------------------------------------ files
def _map_variables(obj: Any, fn: Callable[[Any], Any], inside: bool = False) -> Any:
    """Copy of ``obj`` with every array under an ``@variables`` key replaced by ``fn(array)``.

    ``None`` stays ``None``; in YAML an array node is a dict marked ``@is_variable``.
    """
    if isinstance(obj, dict):
        if obj.get("@is_variable", False):
            return fn(obj)
        return {k: _map_variables(v, fn, inside or k == "@variables") for k, v in obj.items()}
    if isinstance(obj, list):
        return [_map_variables(v, fn, inside) for v in obj]
    if obj is None or not inside:
        return obj
    return fn(obj)


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DeepmdFormatError(
            f"{path}: DeePMD-kit's model format is .dp (HDF5) or .yaml; got {path.suffix!r}"
        )
    return suffix


def _h5py():
    try:
        import h5py
    except ImportError as exc:  # pragma: no cover - h5py comes with dpdata
        raise DeepmdFormatError(
            "writing/reading .dp files needs h5py (pip install h5py); or use .yaml"
        ) from exc
    return h5py


def write_deepmd(data: dict[str, Any], path: PathLike) -> Path:
    """Write a DeePMD-kit model dictionary as ``.dp`` (HDF5) or ``.yaml``.

    Args:
        data: the file dictionary (:func:`to_deepmd`); arrays are numpy arrays.
        path: output file; the suffix chooses the encoding; parent folders are created.

    Returns:
        The path written.
    """
    path = Path(path)
    suffix = _suffix(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".dp":
        h5py = _h5py()
        counter = iter(range(1 << 30))
        with h5py.File(path, "w") as f:

            def store(x: Any) -> str:
                return f.create_dataset(f"variable_{next(counter):04d}", data=x).name

            encoded = _map_variables(data, store)
            f.attrs["json"] = json.dumps(encoded, separators=(",", ":"))
    else:
        import yaml

        def inline(x: Any) -> dict[str, Any]:
            x = np.asarray(x)
            return {
                "@class": "np.ndarray",
                "@is_variable": True,
                "@version": OBJECT_VERSIONS["np.ndarray"],
                "dtype": x.dtype.name,
                "value": x.tolist(),
            }

        with open(path, "w") as f:
            yaml.safe_dump(_map_variables(data, inline), f)
    return path


def read_deepmd(path: PathLike) -> dict[str, Any]:
    """Read a ``.dp`` or ``.yaml`` model file (ours or DeePMD-kit's) into dicts and arrays."""
    path = Path(path)
    suffix = _suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"DeePMD-kit model {path} not found")
    if suffix == ".dp":
        h5py = _h5py()
        try:
            with h5py.File(path, "r") as f:
                data = json.loads(f.attrs["json"])
                return _map_variables(data, lambda name: f[name][()].copy())
        except (OSError, KeyError) as exc:
            raise DeepmdFormatError(
                f"{path} is not a DeePMD-kit .dp model (HDF5 with a 'json' attribute): {exc}"
            ) from exc
    import yaml

    with open(path) as f:
        data = yaml.safe_load(f)

    def decode(node: Any) -> Any:
        if isinstance(node, dict) and node.get("@class") == "np.ndarray":
            _check_version(node, str(path))
            return np.asarray(node["value"], dtype=np.dtype(node["dtype"]))
        return node

    return _map_variables(data, decode)


# ------------------------------------------------------------------------------ dict -> rlekf
def _check_version(obj: dict[str, Any], where: str) -> None:
    cls = obj.get("@class")
    want = OBJECT_VERSIONS.get(cls)
    if want is None:
        raise DeepmdFormatError(f"{where}: unknown object class {cls!r}")
    got = obj.get("@version", 1)
    if got != want:
        raise DeepmdFormatError(
            f"{where}: {cls} is in format version {got}, but rlekf reads and writes the format "
            f"of DeePMD-kit {DEEPMD_KIT_VERSION} ({cls} version {want}); convert the model "
            f"with DeePMD-kit {DEEPMD_KIT_VERSION} (dp convert-backend) or use a matching rlekf"
        )


def _require(cond: bool, where: str, what: str) -> None:
    if not cond:
        raise DeepmdFormatError(f"{where}: {what} has no counterpart in rlekf's DeepPotential")


def _load_layer(dense: Dense, layer: dict[str, Any], where: str) -> None:
    _check_version(layer, where)
    var = layer["@variables"]
    w, b, idt = var["w"], var.get("b"), var.get("idt")
    _require(b is not None and bool(layer.get("bias", True)), where, "a layer without bias")
    _require(
        tuple(np.shape(w)) == (dense.n_in, dense.n_out),
        where,
        f"weights of shape {tuple(np.shape(w))} (expected {(dense.n_in, dense.n_out)})",
    )
    act = str(layer.get("activation_function", "none")).lower()
    _require(act == (_ACTIVATION if dense.activation else "none"), where, f"activation {act}")
    skip = bool(layer.get("resnet", False)) and dense.n_out in (dense.n_in, 2 * dense.n_in)
    _require(skip == dense.resnet, where, f"a skip connection set to {skip}")
    _require((idt is None) == (dense.timestep is None), where, "this timestep layout")
    with torch.no_grad():
        dense.weight.copy_(torch.as_tensor(np.asarray(w), dtype=dense.weight.dtype))
        dense.bias.copy_(torch.as_tensor(np.asarray(b).reshape(-1), dtype=dense.bias.dtype))
        if idt is not None:
            dense.timestep.copy_(
                torch.as_tensor(np.asarray(idt).reshape(-1), dtype=dense.timestep.dtype)
            )


def _load_network(net: torch.nn.Module, data: dict[str, Any], cls: str, where: str) -> None:
    _require(data is not None, where, "a missing network")
    _require(data.get("@class") == cls, where, f"a {data.get('@class')!r} network")
    _check_version(data, where)
    layers = data["layers"]
    _require(len(layers) == len(net.layers), where, f"{len(layers)} layers")
    for i, (dense, layer) in enumerate(zip(net.layers, layers, strict=True)):
        _load_layer(dense, layer, f"{where} layer {i}")


def from_deepmd(data: dict[str, Any], *, where: str = "<dict>") -> DeepPotential:
    """Rebuild a :class:`DeepPotential` from a DeePMD-kit 3.2 se_e2_a energy model.

    Args:
        data: a file dictionary (with ``model``) or the ``model`` object itself, arrays as
            numpy arrays (:func:`read_deepmd`).
        where: a label (the file) used in error messages.

    Returns:
        The model in eval mode, with its statistics set.

    Raises:
        DeepmdFormatError: other format versions, or settings with no counterpart here.
    """
    m = data.get("model", data)
    _check_version(m, f"{where} model")
    _require(m.get("type", "standard") == "standard", where, f"model type {m.get('type')!r}")
    _require(not m.get("atom_exclude_types"), where, "atom_exclude_types")
    _require(not m.get("pair_exclude_types"), where, "pair_exclude_types")
    d, fit = m["descriptor"], m["fitting"]
    wd, wf = f"{where} descriptor", f"{where} fitting"
    _check_version(d, wd)
    _check_version(fit, wf)
    _require(d.get("type") == "se_e2_a", wd, f"descriptor type {d.get('type')!r}")
    _require(fit.get("type") == "ener", wf, f"fitting type {fit.get('type')!r}")
    _require("compress" not in d, wd, "a compressed descriptor")
    _require(not d.get("exclude_types"), wd, "exclude_types")
    _require(float(d.get("env_protection", 0.0)) == 0.0, wd, "env_protection != 0")
    _require(not d.get("env_mat", {}).get("use_exp_switch", False), wd, "use_exp_switch")
    _require(d.get("spin") is None and fit.get("spin") is None, where, "spin")
    for w, obj in ((wd, d), (wf, fit)):
        act = str(obj.get("activation_function", _ACTIVATION)).lower()
        _require(act == _ACTIVATION, w, f"activation {act}")
    for key in ("numb_fparam", "numb_aparam", "dim_case_embd"):
        _require(not fit.get(key), wf, key)
    _require(not fit.get("mixed_types", False), wf, "mixed_types (one fitting net for all)")
    _require(not fit.get("exclude_types"), wf, "exclude_types")
    _require(
        not any(x is not None for x in (fit.get("atom_ener") or [])), wf, "atom_ener (vacuum)"
    )
    _require(d.get("precision") == fit.get("precision"), where, "mixed precisions")
    type_map = list(m["type_map"])
    nt = len(type_map)
    embedding, fitting = list(d["neuron"]), list(fit["neuron"])
    model = DeepPotential(
        type_map,
        rcut=float(d["rcut"]),
        rcut_smth=float(d["rcut_smth"]),
        sel=[int(s) for s in d["sel"]],
        embedding=embedding,
        fitting=fitting,
        axis_neuron=int(d["axis_neuron"]),
        type_one_side=bool(d["type_one_side"]),
        resnet_dt=bool(fit["resnet_dt"]),
        dtype=str(d["precision"]),
    )
    emb = d["embeddings"]
    _check_version(emb, f"{wd} embeddings")
    nets = emb["networks"]
    _require(len(nets) == len(model.embeddings), wd, f"{len(nets)} embedding networks")
    for k, net in enumerate(model.embeddings):
        j = _embedding_index(k, nt, model.type_one_side)
        _load_network(net, nets[j], "EmbeddingNetwork", f"{wd} embedding network {j}")
    fnets = fit["nets"]
    _check_version(fnets, f"{wf} nets")
    _require(len(fnets["networks"]) == nt, wf, f"{len(fnets['networks'])} fitting networks")
    for t, net in enumerate(model.fittings):
        _load_network(net, fnets["networks"][t], "FittingNetwork", f"{wf} network {t}")
    davg = np.asarray(d["@variables"]["davg"], dtype=np.float64).reshape(nt, -1, 4)
    dstd = np.asarray(d["@variables"]["dstd"], dtype=np.float64).reshape(nt, -1, 4)
    _require(
        bool(np.all(davg == davg[:, :1]) and np.all(dstd == dstd[:, :1])),
        wd,
        "davg/dstd that differ between neighbour slots of one type",
    )
    bias = np.asarray(fit["@variables"]["bias_atom_e"], dtype=np.float64).reshape(nt)
    out_bias = m.get("@variables", {}).get("out_bias")
    if out_bias is not None:
        bias = bias + np.asarray(out_bias, dtype=np.float64).reshape(-1, nt)[0]
    model.set_statistics({"env_avg": davg[:, 0], "env_std": dstd[:, 0], "energy_bias": bias})
    return model.eval()


# ------------------------------------------------------------------------------ export
def export_deepmd(
    model: DeepPotential | PathLike, out: PathLike, *, trust_checkpoint: bool = False
) -> Path:
    """Write a trained model (or the model of a checkpoint) in DeePMD-kit's format.

    Args:
        model: a trained :class:`DeepPotential` or the path of an ``rlekf-train`` checkpoint.
        out: ``.dp`` (HDF5) or ``.yaml`` file.
        trust_checkpoint: see :func:`rlekf.export.load_checkpoint`.

    Returns:
        The path written.
    """
    source = "<memory>"
    if isinstance(model, (str, os.PathLike)):
        from rlekf.export import load_checkpoint

        source = str(model)
        model, _ = load_checkpoint(model, trust_checkpoint=trust_checkpoint)
    _suffix(Path(out))
    return write_deepmd(to_deepmd(model, source=source), out)
