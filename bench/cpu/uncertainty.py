"""Validation of the Kalman uncertainty (issue 16, item 4) on EMT Cu.

Train on 300 K frames (32-atom cells, three small strains); test on held-out 300 K frames
(in-distribution) and on frames from outside the training distribution: hot (900 K, 1500 K),
strained (±5 %) and defective (one vacancy, 300 K). Sources of σ:

* ``kalman``: one RLEKF model (seed 0), σ from its P, calibrated on the validation frames;
* ``p0I``: the same gradients with P replaced by p0·I (the control), calibrated the same way;
* ``committee``: 4 RLEKF models (seeds 0..3, each trained like the Kalman model: 4× the
  training cost), DeePMD-kit's deviation (population std over the models), calibrated the
  same way (one scale factor) for the NLL/coverage columns.

Measured per source: Spearman ρ(σ, |error|) per frame (energy per atom) and per atom (force
norm error vs per-atom σ_F) on the in-distribution test frames and on all test frames; ROC
AUC of σ (frame: σ_E; frame: max per-atom σ_F) for "outside" vs in-distribution test frames;
calibration on the in-distribution test frames (fraction |e| <= σ, <= 2σ for energies, Gaussian
NLL); cost per frame of each estimator.

    OMP_NUM_THREADS=1 python bench/cpu/uncertainty.py OUT_DIR [--epochs 4] [--model small]

Writes OUT_DIR/results.json and OUT_DIR/results.md (the table).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from rlekf import keys as K
from rlekf.data.dataset import collate_atoms, frame_to_item
from rlekf.data.emt import generate_cu_emt
from rlekf.data.readers import Frame
from rlekf.export import load_checkpoint
from rlekf.uncertainty import (
    IsotropicCovariance,
    calibrate_scale,
    coverage,
    flat_gradients,
    gaussian_nll,
    load_covariance,
)

ROOT = Path(__file__).resolve().parents[2]
SIZE = 2  # 32 atoms


def _write_extxyz(path: Path, frames: list[Frame]) -> None:
    from ase.io import write

    write(str(path), [f.to_atoms() for f in frames], format="extxyz")


def _vacancy_frames(n: int, seed: int) -> list[Frame]:
    """300 K Langevin MD (EMT) of the 32-atom cell with one atom removed."""
    from ase import units
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    rng = np.random.default_rng(seed)
    atoms = bulk("Cu", "fcc", a=3.61, cubic=True).repeat(SIZE)
    del atoms[int(rng.integers(len(atoms)))]
    atoms.calc = EMT()
    MaxwellBoltzmannDistribution(atoms, temperature_K=600, rng=rng)
    dyn = Langevin(
        atoms, 5 * units.fs, temperature_K=300, friction=0.02 / units.fs, rng=rng, fixcm=False
    )
    dyn.run(20)
    out = []
    for i in range(n):
        dyn.run(10)
        atoms.wrap()
        out.append(Frame.from_atoms(atoms, source="<vacancy>", index=i))
    return out


def make_pwmat_data(out: Path) -> dict[str, list[Frame]]:
    """cu_pwmat (72-atom Cu, PWmat AIMD, 1 fs steps): 300 K frames 0-69 train, 70-84
    validate, 85-99 test in distribution; every 3rd frame of the 500 K run is "outside"."""
    from rlekf.data.readers import read_frames

    data = ROOT.parent / "shared" / "data" / "cu_pwmat"
    cold = read_frames(data / "0_300_MOVEMENT", fmt="pwmat/movement", use_virial=False)
    hot = read_frames(data / "1_500_MOVEMENT", fmt="pwmat/movement", use_virial=False)
    sets = {
        "train": cold[:70],
        "val": cold[70:85],
        "test_300K": cold[85:],
        "500K": hot[::3],
    }
    for name, frames in sets.items():
        _write_extxyz(out / f"{name}.extxyz", frames)
    return sets


def make_data(out: Path) -> dict[str, list[Frame]]:
    strains = (-0.01, 0.0, 0.01)
    pool = generate_cu_emt(n_frames=120, size=SIZE, seed=0, temperatures=(300.0,), strains=strains)
    # per strain block of 40 consecutive frames: the first 30 train, the last 10 validate
    train = [f for i, f in enumerate(pool) if i % 40 < 30]
    val = [f for i, f in enumerate(pool) if i % 40 >= 30]
    sets = {
        "train": train,
        "val": val,
        "test_300K": generate_cu_emt(
            n_frames=30, size=SIZE, seed=1, temperatures=(300.0,), strains=strains
        ),
        "hot": generate_cu_emt(
            n_frames=30, size=SIZE, seed=2, temperatures=(900.0, 1500.0), strains=(0.0,)
        ),
        "strained": generate_cu_emt(
            n_frames=30, size=SIZE, seed=3, temperatures=(300.0,), strains=(-0.05, 0.05)
        ),
        "vacancy": _vacancy_frames(20, seed=4),
    }
    for name, frames in sets.items():
        _write_extxyz(out / f"{name}.extxyz", frames)
    return sets


def train(out: Path, seed: int, epochs: int, model: str) -> tuple[Path, float]:
    run = out / f"rlekf_seed{seed}"
    ckpt = run / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt, float(json.loads((run / "train_time.json").read_text())["seconds"])
    cmd = [
        str(ROOT / ".venv" / "bin" / "rlekf-train"),
        "data=xyz",
        f"data.path={out / 'train.extxyz'}",
        f"+data.val_path={out / 'val.extxyz'}",
        "data.split=none",
        "data.type_map=[Cu]",
        "data.sel=[100]",
        "data.stats_frames=90",
        f"model={model}",
        "optim=rlekf",
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        "trainer=cpu",
        "test=false",
        "logger=csv",
        "extras.print_config=false",
        "~callbacks.rich_progress_bar",
        f"hydra.run.dir={run}",
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    (run / "train_time.json").write_text(json.dumps({"seconds": seconds}))
    return ckpt, seconds


def _batch(frame: Frame, cfg, dtype) -> dict:
    return collate_atoms(
        [frame_to_item(frame, cfg["type_map"], cfg["rcut"], cfg["sel"], 0, dtype)]
    )


def kalman_raw(ckpt: Path, sets: dict[str, list[Frame]]) -> dict:
    """Per frame: errors, raw g^T P g and p0·|g|^2 (exact forces, per atom), and timings."""
    model, cfg = load_checkpoint(ckpt)
    cov = load_covariance(ckpt, model)
    iso = IsotropicCovariance(float(cov._group["p0"]))
    params = list(model.parameters())
    res: dict = {}
    t_grad = t_quad = t_iso = t_fwd = t_signed = 0.0
    n_eval = 0
    sign_gen = torch.Generator().manual_seed(0)
    for name, frames in sets.items():
        if name == "train":
            continue
        rows = []
        for frame in frames:
            batch = _batch(frame, cfg, model.dtype)
            n = len(frame.numbers)
            t0 = time.perf_counter()
            out0 = model(batch, forces=True)
            t1 = time.perf_counter()
            out = model(batch, forces=True, create_graph=True)
            f = out[K.FORCES]
            outputs = torch.cat([out[K.ENERGY], f.reshape(-1)])
            G = flat_gradients(outputs, params)
            t2 = time.perf_counter()
            v = cov.predictive_variance(G).numpy()
            t3 = time.perf_counter()
            vi = iso.predictive_variance(G).numpy()
            t4 = time.perf_counter()
            # the signed estimator: n gradients of sign-weighted per-atom sums
            s = torch.randint(0, 2, (n, 3), generator=sign_gen).to(f.dtype) * 2 - 1
            Gs = flat_gradients((f * s).sum(1), params)
            vs = cov.predictive_variance(Gs).numpy()
            t5 = time.perf_counter()
            t_fwd += t1 - t0
            t_grad += t2 - t1
            t_quad += t3 - t2
            t_iso += t4 - t3
            t_signed += t5 - t4
            n_eval += 1
            de = (float(out0[K.ENERGY].detach()[0]) - frame.energy) / n
            df = out0[K.FORCES].detach().double().numpy() - frame.forces
            rows.append(
                {
                    "n": n,
                    "e_err": de,
                    "f_err": np.linalg.norm(df, axis=1).tolist(),
                    "f_comp_err": df.reshape(-1).tolist(),
                    "kal_e": float(v[0]) / n**2,
                    "kal_fc": v[1:].tolist(),
                    "kal_f": v[1:].reshape(n, 3).sum(1).tolist(),
                    "kal_f_signed": vs.tolist(),
                    "iso_e": float(vi[0]) / n**2,
                    "iso_f": vi[1:].reshape(n, 3).sum(1).tolist(),
                    "pred_e": float(out0[K.ENERGY].detach()[0]) / n,
                    "pred_f": out0[K.FORCES].detach().double().numpy().tolist(),
                    "pred_v": model(batch, forces=False, virial=True)[K.VIRIAL]
                    .detach()
                    .double()
                    .numpy()
                    .reshape(9)
                    .tolist(),
                }
            )
        res[name] = rows
    res["timing"] = {
        "n_frames": n_eval,
        "forward_forces_s": t_fwd / n_eval,
        "exact_gradients_s": t_grad / n_eval,
        "exact_quadratic_s": t_quad / n_eval,
        "p0I_quadratic_s": t_iso / n_eval,
        "signed_total_s": t_signed / n_eval,
    }
    return res


def committee_preds(ckpts: list[Path], sets: dict[str, list[Frame]]) -> dict:
    models = [load_checkpoint(c) for c in ckpts]
    res = {}
    t = 0.0
    n_eval = 0
    for name, frames in sets.items():
        if name == "train":
            continue
        rows = []
        for frame in frames:
            n = len(frame.numbers)
            es, fs = [], []
            t0 = time.perf_counter()
            for model, cfg in models:
                out = model(_batch(frame, cfg, model.dtype), forces=True)
                es.append(float(out[K.ENERGY].detach()[0]) / n)
                fs.append(out[K.FORCES].detach().double().numpy())
            t += time.perf_counter() - t0
            n_eval += 1
            es, fs = np.array(es), np.stack(fs)
            rows.append(
                {
                    "e_std": float(np.std(es)),
                    "f_std": np.linalg.norm(np.std(fs, axis=0), axis=-1).tolist(),
                    "mean_e_err": float(es.mean() - frame.energy / n),
                    "members_e_err": (es - frame.energy / n).tolist(),
                }
            )
        res[name] = rows
    res["timing"] = {"committee_forward_forces_s": t / n_eval}
    return res


# ------------------------------------------------------------------------- statistics
def spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    rx = np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(float)
    ry = np.argsort(np.argsort(y, kind="stable"), kind="stable").astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def roc_auc(pos, neg) -> float:
    """P(score of a positive > score of a negative), ties counted half (Mann-Whitney)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (pos.size * neg.size))


OUTSIDE = ("hot", "strained", "vacancy")


def analyse(kal: dict, com: dict, outside: tuple[str, ...] = OUTSIDE) -> dict:
    def frame_vals(src: str, name: str):
        rows_k, rows_c = kal[name], com[name]
        e_err = np.array([r["e_err"] for r in rows_k])
        if src == "kalman":
            var_e = np.array([r["kal_e"] for r in rows_k])
            var_f = [np.array(r["kal_f"]) for r in rows_k]
        elif src == "kalman_signed":
            var_e = np.array([r["kal_e"] for r in rows_k])
            var_f = [np.clip(np.array(r["kal_f_signed"]), 1e-300, None) for r in rows_k]
        elif src == "p0I":
            var_e = np.array([r["iso_e"] for r in rows_k])
            var_f = [np.array(r["iso_f"]) for r in rows_k]
        else:
            var_e = np.array([r["e_std"] for r in rows_c]) ** 2
            var_f = [np.array(r["f_std"]) ** 2 for r in rows_c]
        f_err = [np.array(r["f_err"]) for r in rows_k]
        return e_err, var_e, f_err, var_f

    out: dict = {}
    for src in ("kalman", "kalman_signed", "p0I", "committee"):
        e_err, var_e, f_err, var_f = frame_vals(src, "val")
        s_e = calibrate_scale(np.maximum(var_e, 1e-300), e_err**2)
        s_f = calibrate_scale(
            np.maximum(np.concatenate(var_f), 1e-300), np.concatenate(f_err) ** 2
        )
        row: dict = {"scale_e": s_e, "scale_f": s_f}
        # in-distribution test: ranking and calibration
        e_err, var_e, f_err, var_f = frame_vals(src, "test_300K")
        sig_e = np.sqrt(s_e * var_e)
        row["rho_e_id"] = spearman(sig_e, np.abs(e_err))
        row["rho_f_id"] = spearman(np.concatenate(var_f), np.concatenate(f_err))
        row["cov1_e_id"] = coverage(e_err, sig_e, 1)
        row["cov2_e_id"] = coverage(e_err, sig_e, 2)
        row["nll_e_id"] = gaussian_nll(e_err, sig_e)
        sig_f = np.sqrt(s_f * np.concatenate(var_f) / 3)  # per component, isotropic
        # |ΔF_a| within sqrt(tr Σ_a): expected P(χ²_3 <= 3) = 0.608 for a calibrated Gaussian
        row["cov1_f_id"] = coverage(np.concatenate(f_err), np.sqrt(3) * sig_f, 1)
        # all test frames together
        allv = [frame_vals(src, n) for n in ("test_300K", *outside)]
        row["rho_e_all"] = spearman(
            np.concatenate([v[1] for v in allv]), np.abs(np.concatenate([v[0] for v in allv]))
        )
        row["rho_f_all"] = spearman(
            np.concatenate([np.concatenate(v[3]) for v in allv]),
            np.concatenate([np.concatenate(v[2]) for v in allv]),
        )
        for name, v in zip(("test_300K", *outside), allv, strict=True):
            row[f"rmse_e_{name}"] = float(np.sqrt(np.mean(v[0] ** 2)))
            row[f"mean_sigma_e_{name}"] = float(np.mean(np.sqrt(s_e * v[1])))
            row[f"mean_sigma_f_{name}"] = float(np.mean(np.sqrt(s_f * np.concatenate(v[3]))))
            row[f"rmse_f_{name}"] = float(np.sqrt(np.mean(np.concatenate(v[2]) ** 2)))
        id_e, id_f = allv[0][1], [x.max() for x in allv[0][3]]
        for name, v in zip(outside, allv[1:], strict=True):
            row[f"auc_e_{name}"] = roc_auc(v[1], id_e)
            row[f"auc_f_{name}"] = roc_auc([x.max() for x in v[3]], id_f)
        row["auc_e_outside"] = roc_auc(np.concatenate([v[1] for v in allv[1:]]), id_e)
        row["auc_f_outside"] = roc_auc([x.max() for v in allv[1:] for x in v[3]], id_f)
        out[src] = row
    return out


def table(stats: dict, timing: dict, meta: dict, outside: tuple[str, ...] = OUTSIDE) -> str:
    srcs = [
        ("kalman", "Kalman σ (P, exact forces)"),
        ("kalman_signed", "Kalman σ (P, signed forces)"),
        ("p0I", "control: P → p0·I"),
        ("committee", "committee of 4 (4× training)"),
    ]
    metrics = [
        ("rho_e_id", "Spearman σ_E vs |ΔE|, 300 K test frames"),
        ("rho_f_id", "Spearman σ_F,a vs |ΔF_a|, 300 K test atoms"),
        ("rho_e_all", "Spearman σ_E vs |ΔE|, all test frames"),
        ("rho_f_all", "Spearman σ_F,a vs |ΔF_a|, all test atoms"),
        *[(f"auc_e_{o}", f"ROC AUC σ_E: {o} vs 300 K") for o in outside],
        *[(f"auc_f_{o}", f"ROC AUC max σ_F: {o} vs 300 K") for o in outside],
        ("cov1_e_id", "300 K: fraction |ΔE| ≤ σ_E (0.683 ideal)"),
        ("cov2_e_id", "300 K: fraction |ΔE| ≤ 2σ_E (0.954 ideal)"),
        ("nll_e_id", "300 K: Gaussian NLL of ΔE per atom (lower better)"),
        ("cov1_f_id", "300 K: fraction |ΔF_a| ≤ σ_F,a (0.608 ideal)"),
    ]
    lines = [
        "| measure | " + " | ".join(s[1] for s in srcs) + " |",
        "|---|" + "---|" * len(srcs),
    ]
    for key, label in metrics:
        cells = []
        for s, _ in srcs:
            v = stats[s][key]
            cells.append(f"{v:.3f}" if key != "nll_e_id" else f"{v:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "| set | RMSE E (meV/atom) | mean σ_E Kalman | mean σ_E committee | "
        "RMSE F (eV/Å) | mean σ_F Kalman | mean σ_F committee |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for name in ("test_300K", *outside):
        k, c = stats["kalman"], stats["committee"]
        lines.append(
            f"| {name} | {1e3 * k[f'rmse_e_{name}']:.2f} | "
            f"{1e3 * k[f'mean_sigma_e_{name}']:.2f} | {1e3 * c[f'mean_sigma_e_{name}']:.2f} | "
            f"{k[f'rmse_f_{name}']:.3f} | {k[f'mean_sigma_f_{name}']:.3f} | "
            f"{c[f'mean_sigma_f_{name}']:.3f} |"
        )
    lines.append("")
    t = timing
    n = meta["n_atoms"]
    lines.append(f"Cost per frame ({n} atoms, {meta['n_params']} parameters, loaded machine):")
    lines.append("")
    lines.append("| estimator | gradients | seconds per frame |")
    lines.append("|---|---|---|")
    lines.append(f"| energy + forces (one model) | – | {t['forward_forces_s']:.4f} |")
    lines.append(
        f"| committee of 4 (forward + forces ×4) | – | {t['committee_forward_forces_s']:.4f} |"
    )
    lines.append(
        f"| Kalman exact (σ_E + 3N force components) | {1 + 3 * n} | "
        f"{t['exact_gradients_s'] + t['exact_quadratic_s']:.3f} "
        f"(gradients {t['exact_gradients_s']:.3f}, g^T P g {t['exact_quadratic_s']:.3f}) |"
    )
    lines.append(f"| Kalman signed (N per-atom sums) | {n} | {t['signed_total_s']:.3f} |")
    lines.append(f"| p0·I control (given the gradients) | – | {t['p0I_quadratic_s']:.4f} |")
    return "\n".join(lines)


def cost_default_model(out: Path, size: int = 3, repeats: int = 2) -> dict:
    """Seconds per frame of each estimator for the default Cu model (26,651 parameters,
    P in 7 blocks of <= 5120, 0.45 GiB) on the 108-atom cell (the cost does not depend on
    the values in P: a fresh filter is timed)."""
    from rlekf.models import DeepPotential
    from rlekf.optim import RLEKF
    from rlekf.uncertainty import predictive_variances

    frame = generate_cu_emt(n_frames=1, size=size, seed=5, temperatures=(300.0,), strains=(0.0,))[
        0
    ]
    model = DeepPotential(
        ["Cu"],
        rcut=6.0,
        rcut_smth=0.5,
        sel=[100],
        embedding=[25, 25, 25],
        fitting=[50, 50, 50],
        axis_neuron=16,
        seed=0,
    )
    model.set_statistics(
        {"env_avg": [[0.1, 0, 0, 0]], "env_std": [[0.3, 0.2, 0.2, 0.2]], "energy_bias": [-3.5]}
    )
    cfg = {"type_map": ["Cu"], "rcut": 6.0, "sel": [100]}
    opt = RLEKF(model.parameters(), block_size=5120, max_p_bytes=None)
    batch = _batch(frame, cfg, model.dtype)
    opt.predictive_variance(torch.zeros(1, sum(p.numel() for p in model.parameters())))
    res = {"n_atoms": len(frame.numbers), "n_params": sum(p.numel() for p in model.parameters())}
    cases = {
        "forward_forces": lambda: model(batch, forces=True),
        "energy_only": lambda: predictive_variances(model, batch, opt, forces=None),
        "signed": lambda: predictive_variances(model, batch, opt, forces="signed"),
        "exact": lambda: predictive_variances(model, batch, opt, forces="exact"),
        "exact_with_virial": lambda: predictive_variances(
            model, batch, opt, forces="exact", virial=True
        ),
    }
    for name, fn in cases.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        res[name + "_s"] = min(times)
        print(f"cost {name}: {min(times):.3f} s", flush=True)
    (out / "cost_default_model.json").write_text(json.dumps(res, indent=1))
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--model", default="small")
    ap.add_argument("--data", choices=("emt", "cu_pwmat"), default="emt")
    ap.add_argument(
        "--cost-only", action="store_true", help="only time the estimators on the default model"
    )
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.cost_only:
        cost_default_model(out)
        return 0
    t_start = time.perf_counter()
    outside = OUTSIDE if args.data == "emt" else ("500K",)
    sets = make_data(out) if args.data == "emt" else make_pwmat_data(out)
    print(f"data: { ({k: len(v) for k, v in sets.items()}) }", flush=True)
    ckpts, train_s = [], []
    for seed in range(4):
        c, s = train(out, seed, args.epochs, args.model)
        ckpts.append(c)
        train_s.append(s)
        print(f"trained seed {seed} in {s:.0f} s", flush=True)
    kal = kalman_raw(ckpts[0], sets)
    print("kalman done", flush=True)
    com = committee_preds(ckpts, sets)
    stats = analyse(kal, com, outside)
    model, _ = load_checkpoint(ckpts[0])
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
        f"torch threads {torch.get_num_threads()}",
        "epochs": args.epochs,
        "model": args.model,
        "data": args.data,
        "n_atoms": len(sets["test_300K"][0].numbers),
        "n_params": sum(p.numel() for p in model.parameters()),
        "train_seconds": train_s,
        "total_seconds": time.perf_counter() - t_start,
        "sets": {k: len(v) for k, v in sets.items()},
    }
    timing = {**kal["timing"], **com["timing"]}
    (out / "results.json").write_text(
        json.dumps({"meta": meta, "stats": stats, "timing": timing}, indent=1)
    )
    md = table(stats, timing, meta, outside)
    (out / "results.md").write_text(md + "\n")
    print(json.dumps(meta, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
