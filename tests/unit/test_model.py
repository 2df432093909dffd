"""Deep Potential: parameter layout, forces/virial vs finite differences, invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rlekf import keys as K
from rlekf.models import DeepPotential
from tests.helpers.frames import cu_frame, energy, model_and_batch, water_like_frame

CU_SEQUENCE = [25, 25, 625, 25, 625, 25, 20000, 50, 2500, 50, 50, 2500, 50, 50, 50, 1]


def test_parameter_order_and_counts_match_reference():
    cu = DeepPotential(["Cu"], sel=[100])
    assert [p.numel() for p in cu.parameters()] == CU_SEQUENCE
    assert sum(p.numel() for p in cu.parameters()) == 26651
    water = DeepPotential(["O", "H"], sel=[46, 92])
    sizes = [p.numel() for p in water.parameters()]
    assert sum(sizes) == 56002
    assert sizes == CU_SEQUENCE[:6] * 4 + CU_SEQUENCE[6:] * 2
    one_side = DeepPotential(["O", "H"], sel=[46, 92], type_one_side=True)
    assert sum(p.numel() for p in one_side.parameters()) == 53302


def _fd_forces(model, batch, atoms, h=1e-5):
    pos = batch[K.POSITIONS].clone()
    out = np.zeros((len(atoms), 3))
    for row, a in enumerate(atoms):
        for c in range(3):
            p1, p2 = pos.clone(), pos.clone()
            p1[a, c] += h
            p2[a, c] -= h
            de = energy(model, batch, p1).sum() - energy(model, batch, p2).sum()
            out[row, c] = -float(de) / (2 * h)
    return out


@pytest.mark.parametrize("case", ["cu", "water_like"])
def test_forces_equal_central_finite_differences(case):
    if case == "cu":
        model, batch = model_and_batch([cu_frame(2)], ["Cu"], [100])
    else:
        model, batch = model_and_batch([water_like_frame()], ["O", "H"], [46, 92], rcut=4.0)
    forces = model(batch)[K.FORCES].detach().numpy()
    atoms = [0, 3, 7]
    fd = _fd_forces(model, batch, atoms)
    ref = forces[atoms]
    assert np.abs(ref).max() > 1e-3, "forces too small for a meaningful check"
    rel = np.abs(fd - ref).max() / np.abs(ref).max()
    assert rel < 1e-6, rel


def test_forces_on_real_water_frame(shared_data):
    from rlekf.data.readers import read_frames

    frame = read_frames(shared_data / "water_deepmd" / "data_0")[0]
    model, batch = model_and_batch([frame], ["O", "H"], [46, 92])
    forces = model(batch)[K.FORCES].detach().numpy()
    atoms = [0, 100]
    fd = _fd_forces(model, batch, atoms)
    rel = np.abs(fd - forces[atoms]).max() / np.abs(forces[atoms]).max()
    assert rel < 1e-6, rel


def test_virial_equals_finite_strain_derivative():
    model, batch = model_and_batch([cu_frame(2, seed=3)], ["Cu"], [100])
    virial = model(batch, virial=True)[K.VIRIAL][0].detach().numpy()
    pos, cell = batch[K.POSITIONS], batch[K.CELL]
    h = 1e-6
    fd = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            e = []
            for sgn in (1, -1):
                eps = torch.zeros(3, 3, dtype=torch.float64)
                eps[i, j] = sgn * h
                m = torch.eye(3, dtype=torch.float64) + eps
                e.append(energy(model, batch, pos @ m, cell @ m).sum())
            fd[i, j] = -float(e[0] - e[1]) / (2 * h)
    assert np.abs(virial).max() > 1e-3
    assert np.abs(fd - virial).max() / np.abs(virial).max() < 1e-6


def test_energy_invariances():
    frame = cu_frame(2, seed=5)
    model, batch = model_and_batch([frame], ["Cu"], [100])
    e0 = float(energy(model, batch).sum())
    rng = np.random.default_rng(1)
    # rotation of positions and cell
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    from tests.helpers.frames import Frame

    def rebuilt(positions, cell, numbers=frame.numbers):
        f = Frame(
            positions=positions,
            cell=cell,
            pbc=frame.pbc,
            numbers=numbers,
            energy=frame.energy,
            forces=frame.forces,
            source="<t>",
        )
        return model_and_batch([f], ["Cu"], [100])[1]

    e_rot = float(energy(model, rebuilt(frame.positions @ q.T, frame.cell @ q.T)).sum())
    e_tr = float(energy(model, rebuilt(frame.positions + [0.3, -1.2, 2.5], frame.cell)).sum())
    perm = rng.permutation(len(frame.numbers))
    e_perm = float(energy(model, rebuilt(frame.positions[perm], frame.cell)).sum())
    # atoms moved to other periodic images (unwrapped positions)
    shifts = rng.integers(-2, 3, size=(len(frame.numbers), 3))
    e_img = float(energy(model, rebuilt(frame.positions + shifts @ frame.cell, frame.cell)).sum())
    for e in (e_rot, e_tr, e_perm, e_img):
        assert abs(e - e0) < 1e-9 * abs(e0)


def test_energy_continuous_across_cutoff():
    from rlekf.data.readers import Frame

    def dimer(r):
        f = Frame(
            positions=[[0, 0, 0], [r, 0, 0]],
            cell=np.zeros((3, 3)),
            pbc=[False] * 3,
            numbers=[29, 29],
            energy=0.0,
            forces=np.zeros((2, 3)),
            source="<d>",
        )
        return f

    model, _ = model_and_batch([dimer(3.0)], ["Cu"], [4], rcut=4.0, rcut_smth=3.0)
    from rlekf.data.dataset import collate_atoms, frame_to_item

    def e(r):
        return float(energy(model, collate_atoms([frame_to_item(dimer(r), ["Cu"], 4.0, [4])])))

    inside, at, outside = e(4.0 - 1e-7), e(4.0), e(4.0 + 1e-7)
    assert abs(inside - outside) < 1e-9
    assert abs(at - outside) < 1e-9
    assert abs(e(3.9) - outside) > 1e-8  # the pair does interact inside the cutoff


def test_float32_model_runs_and_agrees():
    frame = cu_frame(2)
    m64, batch = model_and_batch([frame], ["Cu"], [100])
    m32 = DeepPotential(["Cu"], sel=[100], dtype="float32")
    m32.load_state_dict(m64.state_dict())
    out = m32(batch)
    assert out[K.ENERGY].dtype == torch.float64  # energies stay float64 (float32 network)
    assert out[K.FORCES].dtype == torch.float32
    assert torch.allclose(out[K.FORCES].double(), m64(batch)[K.FORCES], atol=1e-4)


@pytest.mark.filterwarnings("ignore:.*torch.jit.*:DeprecationWarning")
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_scripted_model_is_the_same_forward_pass(dtype):
    frames = [water_like_frame(0), water_like_frame(1)]
    small = {"embedding": [8, 16], "fitting": [16, 16], "axis_neuron": 4}
    m64, batch = model_and_batch(frames, ["H", "O"], [80, 40], **small)
    model = DeepPotential(["H", "O"], sel=[80, 40], dtype=dtype, **small)
    model.load_state_dict(m64.state_dict())
    scripted = torch.jit.script(model)
    for forces, virial in ((False, False), (True, False), (True, True)):
        ref = model(batch, forces=forces, virial=virial)
        out = scripted(batch, forces=forces, virial=virial)
        assert set(out) == set(ref)
        for key in ref:
            assert out[key].dtype == ref[key].dtype
            torch.testing.assert_close(out[key], ref[key].detach(), rtol=0, atol=0)
    # training through the scripted model: the force graph is kept (create_graph)
    grads = []
    for net in (model, scripted):
        model.zero_grad(set_to_none=True)
        (net(batch, forces=True, create_graph=True)[K.FORCES] ** 2).sum().backward()
        grads.append([p.grad for p in model.parameters()])
    assert sum(g is not None for g in grads[0]) > len(grads[0]) // 2
    for a, b in zip(*grads, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="sel"):
        DeepPotential(["Cu", "O"], sel=[10])
    with pytest.raises(ValueError, match="rcut_smth"):
        DeepPotential(["Cu"], rcut=3.0, rcut_smth=3.5)
    with pytest.raises(ValueError, match="dtype"):
        DeepPotential(["Cu"], dtype="float16")
    with pytest.raises(ValueError, match="type_map"):
        DeepPotential(["Cu", "Cu"], sel=[1, 1])
