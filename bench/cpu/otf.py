"""On-the-fly learning during heated MD (issue 17, item 3) on EMT Cu: the measured table.

Setup (32-atom fcc Cu cells, ``generate_cu_emt(size=2)``, model ``small``, RLEKF defaults):

* ``m300``: trained on 300 K frames only (90 frames, strains -1/0/+1 %; 30 more validate and
  calibrate its Kalman σ);
* ``m1200``: the offline 1200 K model, trained the same way on 90 frames at 1200 K;
* MD with the model: Langevin, 2 fs, temperature ramped 300 K -> 1200 K over the first
  ``RAMP`` steps, then held; a second run also stretches the cell by +2 % (linear strain);
* (a) no OTF: ``rlekf-otf`` with threshold ∞ (never calls), the relative force error of the
  model against EMT every 10 steps (``errors.csv``: RMSE / RMS of the EMT forces);
* (b) OTF: the same run with a threshold on the energy σ per atom, or on the largest per-atom
  force σ (signed estimator), each the largest of that σ on the 300 K validation frames times
  ``--factor``; replaying 2 earlier frames per call; ``lambda = 1`` (the default of
  ``run_otf``; one control run keeps the checkpoint's ``lambda_t < 1``); reference calls, the
  relative error along the run, and the final model's errors on a fixed 1200 K test set (30
  frames, another MD seed) and on the 300 K validation frames (forgetting);
* controls: ``m300+N``, trained offline from scratch on the 90 frames at 300 K plus N frames
  at 1200 K (N = the OTF run's reference calls: the same labelled frames in all), and ``m1200``.

    OMP_NUM_THREADS=1 python bench/cpu/otf.py OUT_DIR [--epochs 4] [--ramp 1000] [--hold 1000]

Writes OUT_DIR/results.json and OUT_DIR/results.md (the table; ``results_f<factor>.*`` and
run folders ``*_f<factor>`` for ``--factor`` other than 1). Stages are cached in OUT_DIR
(delete a run folder to redo it).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from rlekf import keys as K
from rlekf.data.emt import generate_cu_emt
from rlekf.data.readers import Frame, read_frames

ROOT = Path(__file__).resolve().parents[2]
SIZE = 2  # 32 atoms
STRAINS = (-0.01, 0.0, 0.01)


def _write_extxyz(path: Path, frames: list[Frame]) -> None:
    from ase.io import write

    write(str(path), [f.to_atoms() for f in frames], format="extxyz")


def _split(pool: list[Frame]) -> tuple[list[Frame], list[Frame]]:
    """Per strain block of 40 consecutive frames: the first 30 train, the last 10 validate."""
    return (
        [f for i, f in enumerate(pool) if i % 40 < 30],
        [f for i, f in enumerate(pool) if i % 40 >= 30],
    )


def make_data(out: Path) -> dict[str, Path]:
    paths = {n: out / f"{n}.extxyz" for n in ("train300", "val300", "train1200", "val1200")}
    paths["test1200"] = out / "test1200.extxyz"
    if all(p.is_file() for p in paths.values()):
        return paths
    kw = {"size": SIZE, "strains": STRAINS}
    t300, v300 = _split(generate_cu_emt(n_frames=120, seed=0, temperatures=(300.0,), **kw))
    t1200, v1200 = _split(generate_cu_emt(n_frames=120, seed=10, temperatures=(1200.0,), **kw))
    test = generate_cu_emt(n_frames=30, seed=11, temperatures=(1200.0,), **kw)
    for name, frames in (
        ("train300", t300),
        ("val300", v300),
        ("train1200", t1200),
        ("val1200", v1200),
        ("test1200", test),
    ):
        _write_extxyz(paths[name], frames)
    return paths


def train(run: Path, train_path: Path, val_path: Path, epochs: int, seed: int = 0) -> Path:
    """``rlekf-train`` on the extxyz files (cached: reuses ``run/checkpoints/last.ckpt``)."""
    ckpt = run / "checkpoints" / "last.ckpt"
    if ckpt.is_file():
        return ckpt
    cmd = [
        str(ROOT / ".venv" / "bin" / "rlekf-train"),
        "data=xyz",
        f"data.path={train_path}",
        f"+data.val_path={val_path}",
        "data.split=none",
        "data.type_map=[Cu]",
        "data.sel=[100]",
        "data.stats_frames=90",
        "model=small",
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
    (run / "train_time.json").write_text(json.dumps({"seconds": time.perf_counter() - t0}))
    return ckpt


def calibrate(ckpt: Path, val: Path) -> dict[str, float]:
    """Calibrate the Kalman σ of ``ckpt`` on ``val``; the thresholds: the largest σ there."""
    from rlekf.export import load_checkpoint
    from rlekf.otf import atoms_batch
    from rlekf.uncertainty import KalmanUncertainty, calibrate_checkpoint

    model, _ = load_checkpoint(ckpt)
    batches = [atoms_batch(f, model) for f in read_frames(val)]
    calibrate_checkpoint(ckpt, batches, model=model, force_estimator="signed", source=str(val))
    unc = KalmanUncertainty.from_checkpoint(ckpt, model)
    se, sf = [], []
    for b in batches:
        res = unc(b, forces=True)
        se.append(float(res["energy_std"][0]) / float(b[K.N_ATOMS][0]))
        sf.append(float(np.max(res["forces_std"])))
    return {"energy": max(se), "force": max(sf)}


def test_errors(ckpt: Path, frames: list[Frame]) -> dict[str, float]:
    """Energy RMSE (eV/atom), force RMSE (per component, eV/Å) and RMSE / RMS of the labels."""
    from rlekf.export import load_checkpoint
    from rlekf.otf import atoms_batch, frame_errors

    model, _ = load_checkpoint(ckpt)
    errs = [frame_errors(model, atoms_batch(f, model)) for f in frames]
    f = np.sqrt(np.mean([e["force_rmse"] ** 2 for e in errs]))
    rms = np.sqrt(np.mean([e["force_rms"] ** 2 for e in errs]))
    return {
        "energy_rmse": float(np.sqrt(np.mean([e["energy_error"] ** 2 for e in errs]))),
        "force_rmse": float(f),
        "relative_force_error": float(f / rms),
    }


def md(
    ckpt: Path,
    run: Path,
    threshold: float,
    sigma: str,
    args,
    strain: float,
    forgetting: float | None = 1.0,
) -> dict:
    """One ``run_otf`` (cached by its summary.json) and the relative error along it."""
    from ase.calculators.emt import EMT

    from rlekf.md import cu_supercell
    from rlekf.otf import run_otf

    if not (run / "summary.json").is_file():
        run_otf(
            ckpt,
            cu_supercell(SIZE),
            EMT(),
            run,
            steps=args.ramp + args.hold,
            timestep_fs=2.0,
            temperature_K=300.0,
            temperature_end_K=1200.0,
            ramp_steps=args.ramp,
            strain=strain,
            check_every=10,
            threshold=threshold,
            sigma=sigma,
            replay=args.replay,
            error_every=10,
            seed=args.seed,
            forgetting=forgetting,
            updater={"train_virial": args.train_virial},
        )
    summary = json.loads((run / "summary.json").read_text())
    with open(run / "errors.csv") as fh:
        rows = list(csv.DictReader(fh))

    def rel(lo: int, hi: int) -> float:
        sel = [r for r in rows if lo <= int(r["step"]) <= hi]
        f = np.sqrt(np.mean([float(r["force_rmse"]) ** 2 for r in sel]))
        return float(f / np.sqrt(np.mean([float(r["force_rms"]) ** 2 for r in sel])))

    n = args.ramp + args.hold
    calls = []
    if (run / "calls.csv").is_file():
        with open(run / "calls.csv") as fh:
            calls = [int(r["step"]) for r in csv.DictReader(fh)]
    return {
        "run": str(run),
        "reference_calls": summary["reference_calls"],
        "call_steps": calls,
        "kalman_updates": summary["kalman_updates"],
        "seconds": summary["seconds"],
        "rel_ramp": rel(10, args.ramp),
        "rel_hold": rel(args.ramp + 10, n),
        "rel_all": rel(10, n),
        "final_checkpoint": str(run / "final.ckpt"),
    }


def _git(*cmd: str) -> str:
    return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--ramp", type=int, default=1000, help="MD steps 300 -> 1200 K")
    parser.add_argument("--hold", type=int, default=1000, help="MD steps at 1200 K")
    parser.add_argument("--replay", type=int, default=2)
    parser.add_argument("--factor", type=float, default=1.0, help="threshold / max val σ")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--train-virial", action="store_true", help="assimilate the EMT virials too (runs *_v)"
    )
    parser.add_argument("--stage", choices=("train", "all"), default="all")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = make_data(out)
    m300 = train(out / "m300", data["train300"], data["val300"], args.epochs)
    m1200 = train(out / "m1200", data["train1200"], data["val1200"], args.epochs)
    if args.stage == "train":
        return 0
    thr = {k: v * args.factor for k, v in calibrate(m300, data["val300"]).items()}
    calibrate(m1200, data["val1200"])
    test = read_frames(data["test1200"])
    val300 = read_frames(data["val300"])
    res: dict = {"thresholds": thr, "runs": {}, "models": {}}
    scenarios = {"heat": 0.0, "heat+strain": 0.02}
    suffix = ("" if args.factor == 1.0 else f"_f{args.factor:g}") + (
        "_v" if args.train_virial else ""
    )
    for scen, strain in scenarios.items():
        tag = scen.replace("+", "_")
        runs = res["runs"].setdefault(scen, {})
        runs["m300, no OTF"] = md(m300, out / f"md_{tag}_m300", math.inf, "energy", args, strain)
        runs["m1200, no OTF"] = md(
            m1200, out / f"md_{tag}_m1200", math.inf, "energy", args, strain
        )
        for sigma in ("energy", "force"):
            name = f"m300 + OTF (σ {sigma})"
            run = out / f"md_{tag}_otf_{sigma}{suffix}"
            runs[name] = md(m300, run, thr[sigma], sigma, args, strain)
        # the control: the checkpoint's lambda_t < 1 kept (P inflates)
        if scen == "heat" and not args.train_virial:
            name = "m300 + OTF (σ energy, λ_t kept)"
            run = out / f"md_{tag}_otf_energy_keep{suffix}"
            runs[name] = md(m300, run, thr["energy"], "energy", args, strain, forgetting=None)
    res["models"]["m300"] = {
        "test1200": test_errors(m300, test),
        "val300": test_errors(m300, val300),
    }
    res["models"]["m1200"] = {
        "test1200": test_errors(m1200, test),
        "val300": test_errors(m1200, val300),
    }
    pool = read_frames(data["train1200"])
    for scen, runs in res["runs"].items():
        for name, r in runs.items():
            if not name.startswith("m300 + OTF"):
                continue
            final = Path(r["final_checkpoint"])
            res["models"][f"{name}, {scen}"] = {
                "calls": r["reference_calls"],
                "test1200": test_errors(final, test),
                "val300": test_errors(final, val300),
            }
            n = r["reference_calls"]
            key = f"m300+{n} (offline)"
            if n and key not in res["models"]:
                extra = [pool[int(i)] for i in np.linspace(0, len(pool) - 1, n).round()]
                mixed = out / f"train300+{n}.extxyz"
                _write_extxyz(mixed, read_frames(data["train300"]) + extra)
                ck = train(out / f"m300+{n}", mixed, data["val300"], args.epochs)
                res["models"][key] = {
                    "calls": n,
                    "test1200": test_errors(ck, test),
                    "val300": test_errors(ck, val300),
                }
    res["meta"] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "commit": _git("rev-parse", "--short", "HEAD"),
        "command": " ".join(["python", "bench/cpu/otf.py", *(argv or sys.argv[1:])]),
        "wall_s": time.time() - t0,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (out / f"results{suffix}.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / f"results{suffix}.md").write_text(table(res, args))
    print((out / f"results{suffix}.md").read_text())
    return 0


def table(res: dict, args) -> str:
    """The two markdown tables: the MD runs, and the models on the fixed 1200 K test set."""
    lines = [
        f"Thresholds (largest σ on the 300 K validation frames x {args.factor}): energy "
        f"{res['thresholds']['energy'] * 1e3:.3f} meV/atom, force "
        f"{res['thresholds']['force']:.3f} eV/Å.",
        "",
        "| MD run (Cu 32 atoms, EMT reference) | reference calls | Kalman updates | rel. force "
        f"error, ramp 300->1200 K ({args.ramp} steps) | rel. force error, 1200 K hold "
        f"({args.hold} steps) | whole run |",
        "|---|---|---|---|---|---|",
    ]
    for scen, runs in res["runs"].items():
        for name, r in runs.items():
            lines.append(
                f"| {scen}: {name} | {r['reference_calls']} | {r['kalman_updates']} | "
                f"{r['rel_ramp']:.3f} | {r['rel_hold']:.3f} | {r['rel_all']:.3f} |"
            )
    lines += [
        "",
        "| model | labelled frames | 1200 K test: rel. force error | force RMSE (eV/Å) | "
        "energy RMSE (meV/atom) | 300 K val: rel. force error | energy RMSE (meV/atom) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in res["models"].items():
        t, v = m["test1200"], m["val300"]
        frames = {"m300": "90 (300 K)", "m1200": "90 (1200 K)"}.get(
            name, f"90 (300 K) + {m.get('calls', 0)}"
        )
        lines.append(
            f"| {name} | {frames} | {t['relative_force_error']:.3f} | {t['force_rmse']:.3f} | "
            f"{t['energy_rmse'] * 1e3:.2f} | {v['relative_force_error']:.3f} | "
            f"{v['energy_rmse'] * 1e3:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
