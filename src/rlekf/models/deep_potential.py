"""Deep Potential with the se_e2_a descriptor (DeepPot-SE), as trained by RLEKF.

The model follows ``docs/deep-potential.md``: smooth environment matrix, one embedding net per
(centre type, neighbour type) pair, axis neurons, one ResNet-style fitting net per element with
timestep vectors where widths match, and a per-element energy bias stored as a buffer.
Parameter registration order is, per layer, weight, bias, [timestep]; embedding nets first
(by type pair), then fitting nets (by type) — the order the RLEKF block tables assume.

Units: Å, eV, eV/Å; virial in eV (DeePMD convention, ``-stress·volume``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rlekf import keys as K
from rlekf.models.env import environment_matrix, pair_vectors
from rlekf.utils.dtypes import float_dtype

__all__ = ["Dense", "EmbeddingNet", "FittingNet", "DeepPotential", "resolve_dtype"]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"float64"``/``"float32"`` (Hydra passes strings) into a torch dtype."""
    return float_dtype(dtype, "model dtype")


class Dense(nn.Module):
    """y = act(x W + b), optionally residual: y = x' + d ⊙ act(x W + b).

    ``x'`` is x when widths match and [x, x] when the width doubles. Parameters are registered
    in the order weight (n_in, n_out), bias (n_out,), timestep (n_out,).
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        *,
        activation: bool = True,
        resnet: bool = False,
        timestep: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        self.n_in, self.n_out = n_in, n_out
        self.activation = activation
        self.resnet = resnet and (n_out == n_in or n_out == 2 * n_in)
        self.weight = nn.Parameter(torch.empty(n_in, n_out, dtype=dtype))
        # stored (in, out): RLEKF's output-major block order reads this (rlekf.optim.rlekf)
        self.weight.rlekf_output_dim = 1
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype))
        if timestep and self.resnet:
            self.timestep = nn.Parameter(torch.empty(n_out, dtype=dtype))
        else:
            self.register_parameter("timestep", None)
        self.reset_parameters()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # copy.deepcopy and pickling rebuild the Parameter without its attributes
        super().__setstate__(state)
        self.weight.rlekf_output_dim = 1

    def reset_parameters(self) -> None:
        """DeePMD-style init: W ~ N(0, 1/(n_in+n_out)), b ~ N(0, 1), d ~ N(0.1, 0.001).

        The output-layer bias starts at 0: the energy-bias buffer carries the shift.
        """
        with torch.no_grad():
            self.weight.normal_(0.0, 1.0 / math.sqrt(self.n_in + self.n_out))
            if self.activation:
                self.bias.normal_(0.0, 1.0)
            else:  # output layer: the energy-bias buffer carries the per-element shift
                self.bias.zero_()
            if self.timestep is not None:
                self.timestep.normal_(0.1, 0.001)

    def forward(self, x: Tensor) -> Tensor:
        y = x @ self.weight + self.bias
        if not self.activation:
            return y
        y = torch.tanh(y)
        if self.timestep is not None:
            y = y * self.timestep
        if self.resnet:
            skip = x if self.n_out == self.n_in else torch.cat([x, x], dim=-1)
            y = skip + y
        return y


class EmbeddingNet(nn.Module):
    """Scalar s → R^{M1}; tanh layers, residual where widths match or double, no timesteps."""

    def __init__(self, widths: Sequence[int], dtype: torch.dtype) -> None:
        super().__init__()
        dims = [1, *widths]
        self.layers = nn.ModuleList(
            Dense(a, b, resnet=i > 0, timestep=False, dtype=dtype)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))
        )

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class FittingNet(nn.Module):
    """Descriptor (M1·M2) → atomic energy; ResNet with timestep vectors, linear output."""

    def __init__(self, n_in: int, widths: Sequence[int], resnet_dt: bool, dtype: torch.dtype):
        super().__init__()
        dims = [n_in, *widths]
        layers = [
            Dense(a, b, resnet=i > 0, timestep=resnet_dt, dtype=dtype)
            for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True))
        ]
        layers.append(Dense(dims[-1], 1, activation=False, dtype=dtype))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return x.squeeze(-1)


class DeepPotential(nn.Module):
    """se_e2_a Deep Potential: energy per frame, forces and virial by autograd.

    Args:
        type_map: element symbols; type index k is ``type_map[k]``.
        rcut: cutoff radius r_c (Å).
        rcut_smth: start of the smooth switching r_s (Å).
        sel: maximum neighbours of each type kept (same length as type_map).
        embedding: embedding-net widths, default [25, 25, 25].
        fitting: fitting-net hidden widths, default [50, 50, 50].
        axis_neuron: M2, default 16.
        type_one_side: one embedding net per neighbour type instead of per type pair.
        resnet_dt: timestep vectors in the fitting net (DeePMD default true).
        dtype: "float64" (default) or "float32".
        init: optional callable ``init(model)`` applied after construction (see
            ``rlekf.models.init``); ``None`` keeps the DeePMD-style default.
        seed: seeds the parameter initialisation when given.
    """

    def __init__(
        self,
        type_map: Sequence[str],
        *,
        rcut: float = 6.0,
        rcut_smth: float = 0.5,
        sel: Sequence[int] = (100,),
        embedding: Sequence[int] = (25, 25, 25),
        fitting: Sequence[int] = (50, 50, 50),
        axis_neuron: int = 16,
        type_one_side: bool = False,
        resnet_dt: bool = True,
        dtype: str | torch.dtype = "float64",
        init: Callable[[nn.Module], Any] | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        type_map = list(type_map)
        sel = [int(s) for s in sel]
        if len(type_map) == 0 or len(set(type_map)) != len(type_map):
            raise ValueError(f"type_map must list distinct element symbols, got {type_map}")
        if len(sel) != len(type_map):
            raise ValueError(f"sel {sel} must have one entry per type in type_map {type_map}")
        if not 0.0 <= rcut_smth < rcut:
            raise ValueError(f"need 0 <= rcut_smth < rcut, got {rcut_smth}, {rcut}")
        if axis_neuron > embedding[-1]:
            raise ValueError(f"axis_neuron {axis_neuron} > last embedding width {embedding[-1]}")
        self.dtype = resolve_dtype(dtype)
        self.type_map = type_map
        self.rcut, self.rcut_smth = float(rcut), float(rcut_smth)
        self.sel = sel
        self.axis_neuron = int(axis_neuron)
        self.type_one_side = bool(type_one_side)
        self.config = {  # plain Python (TorchScript leaves it out)
            "type_map": type_map,
            "rcut": self.rcut,
            "rcut_smth": self.rcut_smth,
            "sel": sel,
            "embedding": list(embedding),
            "fitting": list(fitting),
            "axis_neuron": self.axis_neuron,
            "type_one_side": self.type_one_side,
            "resnet_dt": bool(resnet_dt),
            "dtype": str(self.dtype).replace("torch.", ""),
        }
        nt = len(type_map)
        self.n_slots = sum(sel)
        self._offsets = [sum(sel[:k]) for k in range(nt)]
        generator_state = None
        if seed is not None:
            generator_state = torch.random.get_rng_state()
            torch.manual_seed(seed)
        try:
            n_emb = nt if type_one_side else nt * nt
            self.embeddings = nn.ModuleList(
                EmbeddingNet(embedding, self.dtype) for _ in range(n_emb)
            )
            n_desc = embedding[-1] * axis_neuron
            self.fittings = nn.ModuleList(
                FittingNet(n_desc, fitting, resnet_dt, self.dtype) for _ in range(nt)
            )
            if init is not None:
                init(self)
        finally:
            if generator_state is not None:
                torch.random.set_rng_state(generator_state)
        self.register_buffer("env_avg", torch.zeros(nt, 4, dtype=self.dtype))
        self.register_buffer("env_std", torch.ones(nt, 4, dtype=self.dtype))
        # float64 whatever the model dtype: -4968 eV/atom in float32 is 0.0005 eV coarse
        self.register_buffer("energy_bias", torch.zeros(nt, dtype=torch.float64))
        self.register_buffer("stats_fitted", torch.tensor(False))

    # ------------------------------------------------------------------ statistics
    @property
    def ntypes(self) -> int:
        return len(self.type_map)

    def set_statistics(self, stats: Mapping[str, Any]) -> None:
        """Store descriptor normalisation and per-element energy bias (from the training set).

        Args:
            stats: ``env_avg`` (ntypes, 4), ``env_std`` (ntypes, 4), ``energy_bias`` (ntypes,) eV
                (kept in float64 whatever the model dtype).
        """
        with torch.no_grad():
            for name in ("env_avg", "env_std", "energy_bias"):
                buffer = getattr(self, name)
                value = torch.as_tensor(stats[name], dtype=buffer.dtype)
                buffer.copy_(value.reshape(buffer.shape))
            if not torch.all(self.env_std > 0):
                raise ValueError(f"env_std must be positive, got {self.env_std.tolist()}")
            self.stats_fitted.fill_(True)

    # ------------------------------------------------------------------ forward
    def atomic_energy(
        self,
        positions: Tensor,
        cell: Tensor,
        types: Tensor,
        batch: Tensor,
        neighbors: Tensor,
        shifts: Tensor,
    ) -> Tensor:
        """Energy of each atom (N,) in eV, float64 whatever the model dtype.

        The network runs in the model dtype; its output is promoted to float64 before the
        per-element bias is added, so atom and frame energies of large absolute value (PWmat Cu:
        −4968 eV/atom) keep float64 resolution in a float32 model.
        """
        rij, mask = pair_vectors(positions, cell, batch, neighbors, shifts)
        env = environment_matrix(rij, mask, self.rcut_smth, self.rcut)
        # Empty slots hold the zero row before normalisation, exactly like a neighbour at
        # r >= rcut (s = 0), so an atom crossing the cutoff changes E continuously (as in
        # DeePMD-kit; masking them to zero after the shift would make E jump at rcut).
        env = (env - self.env_avg[types].unsqueeze(1)) / self.env_std[types].unsqueeze(1)
        nt = len(self.type_map)
        out = positions.new_zeros(positions.shape[0], dtype=torch.float64)
        # loops over the ModuleLists (not indexing them) keep this TorchScript-compilable
        for ti, fitting in enumerate(self.fittings):
            idx: Tensor | None = None
            env_t = env
            if nt > 1:
                idx = torch.nonzero(types == ti).squeeze(1)
                env_t = env[idx]
            if env_t.shape[0] > 0:
                acc: Tensor | None = None
                for k, net in enumerate(self.embeddings):
                    # net k serves neighbour type k (type_one_side) or the pair (k // nt, k % nt)
                    tj = k if self.type_one_side else k % nt
                    if self.type_one_side or k // nt == ti:
                        start = self._offsets[tj]
                        sl = env_t[:, start : start + self.sel[tj]]
                        g = net(sl[..., :1])  # (n_t, sel_j, M1)
                        term = torch.einsum("nsm,nsk->nmk", g, sl)  # (n_t, M1, 4)
                        acc = term if acc is None else acc + term
                assert acc is not None
                acc = acc / self.n_slots
                desc = acc @ acc[:, : self.axis_neuron].transpose(1, 2)  # (n_t, M1, M2)
                e_net = fitting(desc.reshape(desc.shape[0], -1)).to(torch.float64)
                e_t = e_net + self.energy_bias[ti].to(torch.float64)
                out = e_t if idx is None else out.index_copy(0, idx, e_t)
        return out

    def forward(
        self,
        batch: dict[str, Tensor],
        forces: bool = True,
        virial: bool = False,
        create_graph: bool = False,
    ) -> dict[str, Tensor]:
        """Predict energies (B,) eV, forces (N, 3) eV/Å, virials (B, 3, 3) eV.

        Energies (frame and atom) are float64; forces and virials are in the model dtype.

        The same code runs eagerly and under ``torch.jit.script`` (``rlekf-export``).

        Args:
            batch: a collated batch (see ``rlekf.data.keys``): positions, cell, types, batch,
                neighbors, shifts are read.
            forces: compute forces = −dE/dR by autograd.
            virial: compute the virial = −dE/dε by autograd w.r.t. a cell strain ε.
            create_graph: keep the graph of the derivatives (needed to train on forces).

        Returns:
            ``energy`` (B,), ``atom_energy`` (N,) and, when asked for, ``forces`` (N, 3) and
            ``virial`` (B, 3, 3).
        """
        pos = batch[K.POSITIONS].to(self.dtype)
        cell = batch[K.CELL].to(self.dtype)
        idx = batch[K.BATCH]
        types, neighbors, shifts = batch[K.TYPES], batch[K.NEIGHBORS], batch[K.SHIFTS]
        n_frames = cell.shape[0]
        need = forces or virial
        if not need:
            e_atom = self.atomic_energy(pos, cell, types, idx, neighbors, shifts)
            energy = e_atom.new_zeros(n_frames).index_add(0, idx, e_atom)
            return {K.ENERGY: energy, K.ATOM_ENERGY: e_atom}
        if not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        inputs = [pos]
        pos_in, cell_in = pos, cell
        if virial:
            strain = torch.zeros(n_frames, 3, 3, dtype=self.dtype, device=pos.device)
            strain.requires_grad_(True)
            inputs.append(strain)
            pos_in = pos + torch.einsum("ni,nij->nj", pos, strain[idx])
            cell_in = cell + cell @ strain
        if torch.jit.is_scripting():  # TorchScript has no enable_grad: call it with grad on
            e_atom = self.atomic_energy(pos_in, cell_in, types, idx, neighbors, shifts)
        else:
            with torch.enable_grad():
                e_atom = self.atomic_energy(pos_in, cell_in, types, idx, neighbors, shifts)
        energy = e_atom.new_zeros(n_frames).index_add(0, idx, e_atom)
        out = {K.ENERGY: energy, K.ATOM_ENERGY: e_atom}
        grads = torch.autograd.grad(
            [energy.sum()], inputs, create_graph=create_graph, retain_graph=create_graph
        )
        if forces:
            g_pos = grads[0]
            assert g_pos is not None
            out[K.FORCES] = -g_pos
        if virial:
            g_strain = grads[-1]
            assert g_strain is not None
            out[K.VIRIAL] = -g_strain
        return out
