"""CUDA: the model, RLEKF (rank-1 and rank-k) and training agree with the CPU (needs a GPU).

Skipped where torch sees no CUDA device. Float64 throughout: the GPU and the CPU differ only in
the order of floating-point reductions, so results agree to ~1e-12 relative.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import numpy as np
import pytest
import torch

from rlekf.data import keys as K
from rlekf.optim import RLEKF
from rlekf.training.updaters import KalmanUpdater
from tests.helpers.frames import cu_frame, model_and_batch, water_like_frame
from tests.helpers.hydra import FAST_DATA, compose_cfg

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
DT = torch.float64
SMALL = {"embedding": (4, 8), "fitting": (8, 8), "axis_neuron": 4}
TOL = 1e-10


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().cpu(), b.detach().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _flat_params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


@pytest.fixture(scope="module")
def small_cu():
    frames = [cu_frame(1, rattle=0.15, seed=s) for s in range(3)]  # 4-atom cells
    return model_and_batch(frames, ["Cu"], [60], rcut=5.0, **SMALL)


# --------------------------------------------------------------------------- model
@pytest.mark.parametrize("case", ["cu", "water_like"])
def test_model_energy_forces_virial_on_cuda_equal_cpu(case):
    if case == "cu":
        model, batch = model_and_batch([cu_frame(2), cu_frame(2, seed=1)], ["Cu"], [100])
    else:
        model, batch = model_and_batch([water_like_frame()], ["O", "H"], [46, 92], rcut=4.0)
    ref = model(batch, virial=True)
    gpu_model = copy.deepcopy(model).to(CUDA)
    assert next(gpu_model.parameters()).device.type == "cuda"
    out = gpu_model(_to(batch, CUDA), virial=True)
    for key in (K.ENERGY, K.FORCES, K.VIRIAL):
        assert out[key].device.type == "cuda" and out[key].dtype == DT
        assert float(ref[key].detach().abs().max()) > 1e-6, key
        assert _rel(out[key], ref[key]) < TOL, (key, _rel(out[key], ref[key]))


# --------------------------------------------------------------------------- optimizer
def _pair(model: torch.nn.Module, **kw):
    """(CUDA copy of ``model``, CPU params, CPU RLEKF, CUDA params, CUDA RLEKF)."""
    gpu_model = copy.deepcopy(model).to(CUDA)
    p_cpu, p_gpu = list(model.parameters()), list(gpu_model.parameters())
    return gpu_model, p_cpu, RLEKF(p_cpu, **kw), p_gpu, RLEKF(p_gpu, **kw)


def _assert_same_state(o_cpu: RLEKF, o_gpu: RLEKF, p_cpu: list, p_gpu: list) -> None:
    assert o_gpu.n_updates == o_cpu.n_updates > 0 and o_gpu.n_skipped == o_cpu.n_skipped == 0
    assert o_gpu.lam == pytest.approx(o_cpu.lam, rel=1e-15)
    assert o_gpu.last_innovation == pytest.approx(o_cpu.last_innovation, rel=TOL)
    for a, b in zip(o_gpu.covariance, o_cpu.covariance, strict=True):
        assert a.device.type == "cuda" and a.dtype == b.dtype
        assert _rel(a, b) < TOL
    w_gpu = torch.cat([p.detach().reshape(-1).cpu() for p in p_gpu])
    w_cpu = torch.cat([p.detach().reshape(-1) for p in p_cpu])
    assert _rel(w_gpu, w_cpu) < TOL


def test_rlekf_step_on_cuda_equals_cpu(small_cu):
    model, _ = small_cu
    model = copy.deepcopy(model)
    _, p_cpu, o_cpu, p_gpu, o_gpu = _pair(model, block_size=64, symmetrize_every=3)
    assert len(o_cpu.block_sizes) > 2
    gen = torch.Generator().manual_seed(0)
    w0 = _flat_params(model)
    for t in range(7):  # crosses two symmetrizations
        for pc, pg in zip(p_cpu, p_gpu, strict=True):
            g = torch.randn(pc.shape, generator=gen, dtype=DT)
            pc.grad, pg.grad = g.clone(), g.to(CUDA)
        err = 0.1 * (t + 1) * (-1) ** t
        o_cpu.step(error=err)
        o_gpu.step(error=torch.tensor(err, dtype=DT, device=CUDA))  # a device scalar too
    assert _rel(_flat_params(model) - w0, _flat_params(model)) > 0
    _assert_same_state(o_cpu, o_gpu, p_cpu, p_gpu)


@pytest.mark.parametrize("p_dtype", ["float64", "float32"])
def test_rlekf_step_k_on_cuda_equals_cpu(small_cu, p_dtype):
    model, _ = small_cu
    model = copy.deepcopy(model)
    _, p_cpu, o_cpu, p_gpu, o_gpu = _pair(model, block_size=64, p_dtype=p_dtype)
    n_total = sum(p.numel() for p in p_cpu)
    gen = torch.Generator().manual_seed(1)
    for _ in range(4):
        rows = torch.randn(5, n_total, generator=gen, dtype=DT)
        eps = torch.randn(5, generator=gen, dtype=DT)
        r_cpu = o_cpu.step_k(eps, rows)
        # a (k, N) tensor on the GPU once, gradient sets (as from autograd.grad) once
        r_gpu = o_gpu.step_k(eps.to(CUDA), rows.to(CUDA))
        assert r_cpu.applied and r_gpu.applied
        sets = [torch.split(r.to(CUDA), [p.numel() for p in p_gpu]) for r in rows]
        sets = [[g.view_as(p) for g, p in zip(s, p_gpu, strict=True)] for s in sets]
        o_cpu.step_k(eps.tolist(), rows)
        o_gpu.step(error=eps.to(CUDA), grads=sets)  # through step, as Lightning calls it
    if p_dtype == "float64":
        _assert_same_state(o_cpu, o_gpu, p_cpu, p_gpu)
    else:  # float32 P: the same algorithm, float32 rounding in different orders
        assert o_gpu.n_updates == o_cpu.n_updates == 40
        for a, b in zip(o_gpu.covariance, o_cpu.covariance, strict=True):
            assert a.dtype == torch.float32 and _rel(a, b) < 1e-3
            assert torch.isfinite(a).all()


@pytest.mark.parametrize("mode", ["paper", "fused"])
def test_kalman_updater_on_cuda_equals_cpu(small_cu, mode):
    """Real measurement gradients from the model, the updater's atom draws, both modes."""
    model, batch = small_cu
    model = copy.deepcopy(model)
    gpu_model, p_cpu, o_cpu, p_gpu, o_gpu = _pair(model, block_size=64)
    up_cpu = KalmanUpdater(n_select=8, group_size=2, seed=4, mode=mode)
    up_gpu = KalmanUpdater(n_select=8, group_size=2, seed=4, mode=mode)
    batch_gpu = _to(batch, CUDA)
    for _ in range(3):
        out_cpu = up_cpu.update(model, batch, o_cpu).predictions
        out_gpu = up_gpu.update(gpu_model, batch_gpu, o_gpu).predictions
        assert out_gpu[K.FORCES].device.type == "cuda"
        assert _rel(out_gpu[K.ENERGY], out_cpu[K.ENERGY]) < TOL
    assert o_cpu.n_updates == 15
    _assert_same_state(o_cpu, o_gpu, p_cpu, p_gpu)


# --------------------------------------------------------------------------- training
class DeviceCheck(L.Callback):
    """Records where the module, the batches and the Kalman covariance live during fit."""

    seen: set[str] = set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        DeviceCheck.seen.add(f"module:{pl_module.device.type}")
        DeviceCheck.seen.add(f"batch:{batch[K.POSITIONS].device.type}")
        opt = trainer.optimizers[0]
        if hasattr(opt, "covariance"):
            DeviceCheck.seen.update(f"P:{p.device.type}" for p in opt.covariance)


@pytest.mark.parametrize("optim", ["rlekf", "rlekf_fused", "adam"])
def test_short_gpu_fit_and_cpu_checkpoint(optim, tmp_path, data_dir):
    from ase.build import bulk

    from rlekf.calculator import DPCalculator
    from rlekf.train import train

    overrides = [
        f"optim={optim}",
        "trainer=gpu",
        "model=small",
        "logger=csv",
        "trainer.max_epochs=2",
        "test=false",
        "extras.print_config=false",
        "~callbacks.rich_progress_bar",
        "~callbacks.parity_plots",
        f"+callbacks.device_check._target_={__name__}.DeviceCheck",
        *FAST_DATA,
    ]
    if optim != "adam":
        overrides.append("optim.optimizer.block_size=512")  # the small model has 1,505 weights
    cfg = compose_cfg("train", overrides, tmp_path, data_dir)
    DeviceCheck.seen.clear()
    metrics, objects = train(cfg)
    for key in ("val/force_rmse", "val/energy_rmse"):
        assert key in metrics and math.isfinite(float(metrics[key])), (key, metrics)
    # (Lightning moves the module and optimizer state back to the CPU at teardown)
    expected = {"module:cuda", "batch:cuda"} | ({"P:cuda"} if optim != "adam" else set())
    assert DeviceCheck.seen == expected
    trainer = objects["trainer"]
    assert trainer.current_epoch == 2
    opt = trainer.optimizers[0]
    if optim != "adam":
        assert opt.n_updates > 0 and opt.n_skipped == 0
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.exists()

    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(2)
    atoms.positions += np.random.default_rng(0).normal(0.0, 0.1, atoms.positions.shape)
    results = {}
    for device in ("cpu", "cuda"):
        a = atoms.copy()
        a.calc = DPCalculator.from_checkpoint(ckpt, device=device)
        results[device] = (a.get_potential_energy(), a.get_forces())
    e_cpu, f_cpu = results["cpu"]
    e_gpu, f_gpu = results["cuda"]
    assert math.isfinite(e_cpu) and np.isfinite(f_cpu).all()
    assert e_gpu == pytest.approx(e_cpu, rel=TOL)
    np.testing.assert_allclose(f_gpu, f_cpu, rtol=0, atol=TOL * np.abs(f_cpu).max())
