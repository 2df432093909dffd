"""Kalman training on virials: RLEKF with and without the virial measurement, and Adam with its
virial prefactor schedule, on data sets with physical virials (si_mlearn, mapbi3_dpgen).

Each run trains with ``rlekf-train`` (same epochs for every method, validation picks the
checkpoint by ``val/force_rmse``), then ``rlekf-eval`` scores that checkpoint on the data
preset's test split (si_mlearn: the official mlearn test split; mapbi3_dpgen: its seeded
random 10 %). Writes ``runs.csv`` (one row per run) and ``summary.md`` (mean and standard
deviation over seeds) to the output folder.

    python bench/cpu/virial.py OUT [--epochs si_mlearn=2 mapbi3_dpgen=1] [--seeds 0 1 2]
        [--max-frames mapbi3_dpgen=150] [--datasets si_mlearn mapbi3_dpgen]

Wall-clock numbers depend on the machine's load; accuracy numbers are per epoch budget.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent

#: method name -> Hydra overrides. ``task.train_virial=true`` on the run without the virial
#: measurement only makes validation/test report virial errors (the updater ignores them).
METHODS = {
    "rlekf+virial": ["optim=rlekf", "optim.updater.train_virial=true"],
    "rlekf": ["optim=rlekf", "optim.updater.train_virial=false", "task.train_virial=true"],
    "adam+virial": [
        "optim=adam",
        "optim.updater.start_pref_v=0.02",
        "optim.updater.limit_pref_v=1.0",
    ],
}

COMMON = [
    "model=small",
    "logger=csv",
    "test=false",
    "extras.print_config=false",
    "callbacks.last_checkpoint.keep=false",
    "~callbacks.rich_progress_bar",
    "~callbacks.parity_plots",
    "~callbacks.block_partition",
    "~callbacks.model_summary",
]

METRICS = ("energy_rmse", "force_rmse", "virial_rmse", "stress_rmse")
UNITS = {
    "energy_rmse": "meV/atom",
    "force_rmse": "eV/Å",
    "virial_rmse": "meV/atom",
    "stress_rmse": "GPa",
}
SCALE = {"energy_rmse": 1000.0, "force_rmse": 1.0, "virial_rmse": 1000.0, "stress_rmse": 1.0}


def _pairs(items: list[str] | None) -> dict[str, str]:
    return dict(item.split("=", 1) for item in items or [])


def _run(cmd: list[str], log: Path) -> float:
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed (status {proc.returncode}); see {log}")
    return time.time() - t0


def _val_curve(run_dir: Path) -> list[dict[str, float]]:
    """Validation metrics per epoch from the CSV logger."""
    files = sorted(run_dir.glob("csv/**/metrics.csv")) or sorted(run_dir.glob("**/metrics.csv"))
    rows = []
    for path in files:
        with open(path) as fh:
            for r in csv.DictReader(fh):
                if r.get("val/force_rmse"):
                    keep = {k: v for k, v in r.items() if v and k.startswith(("val/", "epoch"))}
                    rows.append({k: float(v) for k, v in keep.items()})
    return rows


def run_one(out: Path, data: str, method: str, seed: int, epochs: int, data_args: list[str]):
    run_dir = out / data / method / f"seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    train = [
        str(BIN / "rlekf-train"),
        f"data={data}",
        *METHODS[method],
        *COMMON,
        *data_args,
        f"seed={seed}",
        f"trainer.max_epochs={epochs}",
        f"task_name=virial_{data}",
        f"hydra.run.dir={run_dir}",
    ]
    train_s = _run(train, run_dir / "train.log")
    ckpts = sorted((run_dir / "checkpoints").glob("best_weights_*.ckpt"))
    if not ckpts:
        raise RuntimeError(f"no best checkpoint in {run_dir}/checkpoints")
    evaluate = [
        str(BIN / "rlekf-eval"),
        f"ckpt_path={ckpts[-1]}",
        f"data={data}",
        *data_args,
        "split=test",
        "progress=false",
        f"hydra.run.dir={run_dir / 'eval'}",
    ]
    _run(evaluate, run_dir / "eval.log")
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    curve = _val_curve(run_dir)
    row = {
        "data": data,
        "method": method,
        "seed": seed,
        "epochs": epochs,
        "train_s": round(train_s, 1),
        "trained_on_virials": metrics.get("trained_on_virials", math.nan),
        "n_test_frames": metrics["n_frames"],
    }
    for key in METRICS:
        row[f"test_{key}"] = metrics.get(key, math.nan)
    for key in ("energy_rmse", "force_rmse", "virial_rmse"):
        row[f"val_{key}_per_epoch"] = " ".join(
            f"{r.get(f'val/{key}', math.nan):.4g}" for r in curve
        )
    return row


def summarise(rows: list[dict], out: Path, header: str) -> str:
    lines = [header, ""]
    for data in dict.fromkeys(r["data"] for r in rows):
        sub = [r for r in rows if r["data"] == data]
        epochs = sub[0]["epochs"]
        lines += [
            f"### {data} ({epochs} epoch(s), {len({r['seed'] for r in sub})} seed(s), "
            f"{int(sub[0]['n_test_frames'])} test frames)",
            "",
            "| method | "
            + " | ".join(f"test {k.replace('_rmse', '')} RMSE ({UNITS[k]})" for k in METRICS)
            + " | train time (s, loaded machine) |",
            "|---" * (len(METRICS) + 2) + "|",
        ]
        for method in dict.fromkeys(r["method"] for r in sub):
            runs = [r for r in sub if r["method"] == method]
            cells = []
            for key in METRICS:
                vals = [SCALE[key] * r[f"test_{key}"] for r in runs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.4g} ± {sd:.2g}")
            t = statistics.mean(r["train_s"] for r in runs)
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {t:.0f} |")
        lines += [
            "",
            "Validation RMSE after each epoch (seed 0; energy eV/atom, force eV/Å, "
            "virial eV/atom):",
            "",
        ]
        for r in sub:
            if r["seed"] == min(x["seed"] for x in sub):
                lines.append(
                    f"- {r['method']}: energy {r['val_energy_rmse_per_epoch']}; force "
                    f"{r['val_force_rmse_per_epoch']}; virial {r['val_virial_rmse_per_epoch']}"
                )
        lines.append("")
    text = "\n".join(lines)
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--datasets", nargs="+", default=["si_mlearn", "mapbi3_dpgen"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", nargs="*", default=["si_mlearn=2", "mapbi3_dpgen=1"])
    parser.add_argument("--max-frames", nargs="*", default=["mapbi3_dpgen=150"])
    parser.add_argument("--extra", nargs="*", default=[], help="more Hydra overrides")
    args = parser.parse_args()
    epochs, max_frames = _pairs(args.epochs), _pairs(args.max_frames)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    results = args.out / "runs.csv"
    for data in args.datasets:
        data_args = list(args.extra)
        if data in max_frames:
            data_args.append(f"data.max_frames={max_frames[data]}")
        for seed in args.seeds:
            for method in args.methods:
                row = run_one(args.out, data, method, seed, int(epochs.get(data, 1)), data_args)
                rows.append(row)
                print(json.dumps(row), flush=True)
                with open(results, "w", newline="") as fh:
                    w = csv.DictWriter(fh, fieldnames=list(rows[0]))
                    w.writeheader()
                    w.writerows(rows)
                header = (
                    f"# Kalman training on virials ({time.strftime('%Y-%m-%d')}, "
                    f"{os.uname().nodename}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})"
                )
                summarise(rows, args.out, header)
    print(summarise(rows, args.out, header))


if __name__ == "__main__":
    main()
