"""Fine-tuning (``rlekf-train ckpt_init=...``) and ``rlekf-change-bias`` through the real configs.

A source checkpoint (RLEKF state after a few updates, epoch 3) is written as ``rlekf-train``
writes ``last.ckpt``; fine-tuning runs start from it in new folders. Their weights and ``P`` at
the first batch are compared with the checkpoint's (read independently with ``torch.load``
and ``state_covariance``).
"""

from __future__ import annotations

import hashlib

import lightning as L
import numpy as np
import pytest
import torch

from rlekf.optim import state_covariance
from rlekf.train import train
from tests.helpers.hydra import FAST_DATA, compose_cfg

P0_NEW = 0.3  # the fine-tune runs' optim.optimizer.p0 (the source run's is 1.0)

# test_resume.py's data (generated once per session): 24 frames, 16 for training
DATA = [
    *FAST_DATA,
    "data.path.n_frames=24",
    "data.n_blocks=6",
    "data.val_fraction=0.17",
    "data.test_fraction=0.17",
]
BASE = [
    "model=small",
    "logger=csv",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "extras.print_config=false",
    "test=false",
    "optim.optimizer.block_size=512",
    "callbacks.parity_plots=null",
    "callbacks.block_partition=null",
    "callbacks.model_summary=null",
    *DATA,
]


class Capture(L.Callback):
    """Weights, P and lambda at the first batch and at the end; epoch and step at the start."""

    def on_train_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.epoch, self.step = trainer.current_epoch, trainer.global_step
        self.w0 = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.p0 = [p.clone() for p in opt.covariance]
        self.lam0 = opt.lam

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.w1 = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        self.p1 = [p.clone() for p in opt.covariance]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def source(tmp_path_factory, data_dir):
    """A checkpoint as ``rlekf-train`` writes it (weights, statistics of the data, model_config,
    RLEKF state after a few updates, epoch 3), and the dict read back from the file.

    Built without a training run (which would cost a fit): the optimizer state comes from four
    rank-1 updates with random measurement gradients.
    """
    import hydra

    from rlekf.models import DeepPotential
    from rlekf.optim import RLEKF

    out = tmp_path_factory.mktemp("source")
    cfg = compose_cfg("train", BASE, out, data_dir)
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    model = DeepPotential(
        ["Cu"], sel=[100], embedding=[8, 16], fitting=[16, 16], axis_neuron=4, seed=3
    )
    model.set_statistics(dm.stats())
    opt = RLEKF(model.parameters(), block_size=512)
    g = torch.Generator().manual_seed(0)
    n = sum(p.numel() for p in model.parameters())
    for _ in range(4):
        opt.step_k([0.01], 0.1 * torch.randn(1, n, generator=g, dtype=torch.float64))
    path = out / "checkpoints" / "last.ckpt"
    path.parent.mkdir()
    torch.save(
        {
            "epoch": 3,
            "global_step": 40,
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "optimizer_states": [opt.state_dict()],
            "model_config": dict(model.config),
        },
        path,
    )
    return path, torch.load(path, map_location="cpu", weights_only=True)


def _finetune(tmp_path, data_dir, ckpt, *extra):
    cfg = compose_cfg(
        "train",
        [
            *BASE,
            "trainer.max_epochs=1",
            f"ckpt_init={ckpt}",
            f"optim.optimizer.p0={P0_NEW}",
            "+callbacks.capture._target_=tests.integration.test_finetune.Capture",
            *extra,
        ],
        tmp_path,
        data_dir,
    )
    metrics, objects = train(cfg)
    (capture,) = [c for c in objects["trainer"].callbacks if isinstance(c, Capture)]
    return capture, objects


@pytest.mark.parametrize(
    "policy",
    [
        "keep",
        pytest.param("reset", marks=pytest.mark.slow),
        pytest.param("inflate", marks=pytest.mark.slow),
    ],
)
def test_finetune_starts_from_the_checkpoint_and_then_learns(policy, source, tmp_path, data_dir):
    path, ckpt = source
    digest = _sha(path)
    extra = [f"finetune.covariance={policy}"]
    if policy == "inflate":  # and the energy bias refitted on the new training split
        extra += ["finetune.inflate=4.0", "finetune.bias=refit"]
    cap, objects = _finetune(tmp_path, data_dir, path, *extra)

    # new run: epoch 0, step 0, its own folder; the source checkpoint untouched
    assert (cap.epoch, cap.step) == (0, 0)
    assert _sha(path) == digest
    new_ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert new_ckpt.is_file() and new_ckpt.parent != path.parent
    written = torch.load(new_ckpt, map_location="cpu", weights_only=True)
    assert (written["epoch"], written["global_step"]) == (0, 10)  # its own first epoch
    assert written["finetune"]["ckpt_init"] == str(path)
    assert written["finetune"]["covariance"] == policy

    # weights, statistics and energy bias exactly the checkpoint's at the first batch
    saved = {k[len("model.") :]: v for k, v in ckpt["state_dict"].items()}
    assert set(cap.w0) == set(saved)
    for k, v in saved.items():
        if k == "energy_bias" and policy == "inflate":
            change = written["finetune"]["bias_change"]
            assert change["old_bias"] == v.tolist() and change["n_frames"] == 16
            assert cap.w0[k].tolist() == change["new_bias"] != change["old_bias"]
            continue
        assert torch.equal(cap.w0[k], v), k

    # P and lambda at the first batch
    saved_opt = ckpt["optimizer_states"][0]
    anchor = saved_opt["state"][saved_opt["param_groups"][0]["params"][0]]
    assert cap.lam0 == anchor["lam"]
    p_saved = state_covariance(saved_opt)
    assert len(p_saved) == len(cap.p0) == 4
    for got, ref in zip(cap.p0, p_saved, strict=True):
        if policy == "keep":
            assert torch.equal(got, ref)
        elif policy == "reset":
            assert torch.equal(got, P0_NEW * torch.eye(ref.shape[0], dtype=ref.dtype))
        else:
            torch.testing.assert_close(got, 4.0 * ref, rtol=1e-14, atol=0)
        assert not torch.equal(got, torch.eye(ref.shape[0], dtype=ref.dtype))

    # and they change with the updates
    opt = objects["trainer"].optimizers[0]
    assert opt.n_updates == int(anchor["n_updates"]) + 2 * 5
    assert not torch.equal(
        cap.w1["fittings.0.layers.0.weight"], cap.w0["fittings.0.layers.0.weight"]
    )
    assert all(not torch.equal(a, b) for a, b in zip(cap.p1, cap.p0, strict=True))
    assert torch.equal(cap.w1["energy_bias"], cap.w0["energy_bias"])  # a buffer, not trained


@pytest.mark.parametrize("policy", ["keep", "reset", "inflate"])
def test_init_optimizer_policies_on_the_checkpoint_state(policy, source):
    from rlekf.finetune import init_optimizer, read_init_checkpoint
    from rlekf.optim import RLEKF

    path, ckpt = source
    init = read_init_checkpoint(path)
    opt = RLEKF(init.model.parameters(), block_size=512, p0=P0_NEW, nu=0.999)
    inflate = 2.5 if policy == "inflate" else None
    what = init_optimizer(opt, init.optimizer_state, covariance=policy, inflate=inflate)
    assert {"keep": "kept", "reset": "reset", "inflate": "inflated"}[policy] in what
    saved = ckpt["optimizer_states"][0]
    anchor = saved["state"][saved["param_groups"][0]["params"][0]]
    assert opt.lam == anchor["lam"] and opt.n_updates == anchor["n_updates"]
    assert opt.param_groups[0]["p0"] == P0_NEW and opt.param_groups[0]["nu"] == 0.999
    for got, ref in zip(opt.covariance, state_covariance(saved), strict=True):
        if policy == "keep":
            assert torch.equal(got, ref)
        elif policy == "reset":
            assert torch.equal(got, P0_NEW * torch.eye(ref.shape[0], dtype=ref.dtype))
        else:
            torch.testing.assert_close(got, 2.5 * ref, rtol=1e-14, atol=0)
    # lambda0 restarts the forgetting factor; the state dict of the checkpoint is not changed
    opt2 = RLEKF(init.model.parameters(), block_size=512)
    init_optimizer(opt2, init.optimizer_state, lambda0=0.95)
    assert opt2.lam == 0.95 and anchor["lam"] != 0.95
    # another block layout is refused with the block size to use
    opt3 = RLEKF(init.model.parameters(), block_size=256)
    with pytest.raises(ValueError, match="block_size=512"):
        init_optimizer(opt3, init.optimizer_state)


def test_finetune_refuses_a_weights_only_checkpoint_for_keep(source, tmp_path, data_dir):
    path, ckpt = source
    weights_only = tmp_path / "weights.ckpt"
    torch.save({k: v for k, v in ckpt.items() if k != "optimizer_states"}, weights_only)
    with pytest.raises(ValueError, match="no RLEKF state.*finetune.covariance=reset"):
        _finetune(tmp_path / "run", data_dir, weights_only)


def test_finetune_refuses_new_elements_naming_them(source, tmp_path, data_dir):
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.io import write

    path, _ = source
    frames = []
    rng = np.random.default_rng(0)
    for _ in range(6):
        atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
        atoms.symbols[:3] = "Au"
        atoms.rattle(0.05, seed=int(rng.integers(1000)))
        atoms.calc = EMT()
        atoms.get_potential_energy()
        frames.append(atoms)
    data = tmp_path / "cuau.extxyz"
    write(data, frames)
    with pytest.raises(ValueError, match=r"\['Au'\].*fine-tuning does not add elements"):
        _finetune(tmp_path / "run", data_dir, path, "data=xyz", f"data.path={data}")


def test_change_bias_writes_a_checkpoint_with_the_hand_fitted_bias(source, tmp_path, data_dir):
    from rlekf.change_bias import change_bias
    from rlekf.export import load_checkpoint
    from rlekf.finetune import predict_energies

    path, ckpt = source
    out = tmp_path / "new.ckpt"
    cfg = compose_cfg(
        "change_bias",
        [f"ckpt_path={path}", f"output={out}", "split=train", *DATA],
        tmp_path,
        data_dir,
    )
    change, written_path = change_bias(cfg)
    assert written_path == out
    # the hand fit: one element, so delta = sum_f n_f r_f / sum_f n_f^2 (normal equation)
    import hydra

    from rlekf.evaluation import select_frames

    model, config = load_checkpoint(path)
    dm = hydra.utils.instantiate(
        cfg.data, **{k: config[k] for k in ("type_map", "rcut", "rcut_smth", "sel", "dtype")}
    )
    ds = select_frames(dm, "train")
    n = np.array(ds.n_atoms, dtype=np.float64)
    r = np.array([float(it["energy"][0]) for it in ds.items]) - predict_energies(model, ds)
    delta = float(n @ r / (n @ n))
    old = float(ckpt["state_dict"]["model.energy_bias"][0])
    assert change.n_frames == len(ds) == 16
    np.testing.assert_allclose(change.new_bias, [old + delta], rtol=0, atol=1e-10)

    new = torch.load(out, map_location="cpu", weights_only=True)
    np.testing.assert_allclose(new["state_dict"]["model.energy_bias"].numpy(), [old + delta])
    for k, v in ckpt["state_dict"].items():  # everything else untouched
        if k != "model.energy_bias":
            assert torch.equal(new["state_dict"][k], v), k
    for a, b in zip(
        state_covariance(new["optimizer_states"][0]),
        state_covariance(ckpt["optimizer_states"][0]),
        strict=True,
    ):
        assert torch.equal(a, b)
    (record,) = new["bias_changes"]
    assert record["source"] == str(path) and record["split"] == "train"
    assert record["n_frames"] == 16 and record["old_bias"] == [old]
    assert change.energy_rmse_after <= change.energy_rmse_before


def test_finetune_maps_a_subset_of_the_type_map_by_name(tmp_path, data_dir):
    """A Au/Cu checkpoint (Cu is type 1) fine-tuned on Cu-only data (preset type map [Cu]):
    the Cu networks learn, the Au-centred ones are exactly untouched."""
    from rlekf.models import DeepPotential

    model = DeepPotential(
        ["Au", "Cu"], sel=[10, 100], embedding=[8, 16], fitting=[16, 16], axis_neuron=4, seed=1
    )
    model.set_statistics(
        {"env_avg": np.zeros((2, 4)), "env_std": np.full((2, 4), 0.3), "energy_bias": [-3.2, -3.5]}
    )
    ckpt = tmp_path / "auc.ckpt"
    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "model_config": dict(model.config)}, ckpt)
    cap, objects = _finetune(tmp_path / "run", data_dir, ckpt, "finetune.covariance=reset")
    dm = objects["datamodule"]
    assert dm.type_map == objects["model"].type_map == ["Au", "Cu"]
    assert all(bool((it["types"] == 1).all()) for it in dm.datasets["train"].items)
    for k, v in state.items():
        assert torch.equal(cap.w0[k[len("model.") :]], v), k
    # Au-centred nets: fitting 0 and embeddings (Au, Au), (Au, Cu) = 0, 1; Cu's fitting 1
    untouched = [
        k for k in cap.w0 if k.startswith(("fittings.0.", "embeddings.0.", "embeddings.1."))
    ]
    assert untouched and all(torch.equal(cap.w1[k], cap.w0[k]) for k in untouched)
    learned = [k for k in cap.w0 if k.startswith("fittings.1.")]
    assert learned and any(not torch.equal(cap.w1[k], cap.w0[k]) for k in learned)


@pytest.mark.slow
def test_finetune_from_a_checkpoint_written_by_a_training_run(tmp_path, data_dir):
    """The same start-state check on a real ``last.ckpt`` (Lightning's own checkpoint dict)."""
    src = tmp_path / "src"
    train(compose_cfg("train", [*BASE, "trainer.max_epochs=2"], src, data_dir))
    path = src / "checkpoints" / "last.ckpt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (1, 20)
    cap, objects = _finetune(tmp_path / "run", data_dir, path)
    assert (cap.epoch, cap.step) == (0, 0)
    for k, v in ckpt["state_dict"].items():
        assert torch.equal(cap.w0[k[len("model.") :]], v), k
    for got, ref in zip(cap.p0, state_covariance(ckpt["optimizer_states"][0]), strict=True):
        assert torch.equal(got, ref)
    written = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (written["epoch"], written["global_step"]) == (0, 10)


@pytest.mark.slow
def test_resuming_a_finetuned_run_restores_its_own_state(source, tmp_path, data_dir):
    """The fine-tune command plus ``ckpt_path=`` resumes that run: its weights, P and epoch,
    not the ``ckpt_init`` checkpoint's."""
    path, _ = source
    _finetune(tmp_path / "ft", data_dir, path)
    last = tmp_path / "ft" / "checkpoints" / "last.ckpt"
    ft = torch.load(last, map_location="cpu", weights_only=True)
    cap, _ = _finetune(
        tmp_path / "res", data_dir, path, f"ckpt_path={last}", "trainer.max_epochs=2"
    )
    assert cap.epoch == 1 and cap.step == ft["global_step"]
    for k, v in ft["state_dict"].items():
        assert torch.equal(cap.w0[k[len("model.") :]], v), k
    for got, ref in zip(cap.p0, state_covariance(ft["optimizer_states"][0]), strict=True):
        assert torch.equal(got, ref)
