"""Fuzz-style: corrupted files of every format give a DataError naming the file, never a crash.

Each case takes a valid file (extxyz, deepmd/npy, PWmat MOVEMENT), corrupts it at random
(truncation, a dropped column, NaN/inf, garbage bytes, a wrong shape, duplicated atoms, an empty
file) and reads it. Allowed outcomes: the frames that come back pass validation, or a DataError
whose message names the file. Anything else (IndexError, ValueError from numpy, ...) fails.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from ase.io import write

from rlekf.data.readers import DataError, read_frames, validate_frame
from tests.helpers.frames import cu_frame

N_CASES = 12


def _check(path: Path, fmt: str) -> str:
    try:
        frames = read_frames(path, fmt)
    except DataError as exc:
        assert path.name in str(exc) or str(path) in str(exc), str(exc)
        return "error"
    for f in frames:
        validate_frame(f)
    return "read"


def _text_mutations(text: str, rng: np.random.Generator) -> list[str]:
    lines = text.splitlines(keepends=True)
    k = int(rng.integers(len(lines)))
    numbers = [m.span() for m in re.finditer(r"-?\d+\.\d+", text)]
    a, b = numbers[int(rng.integers(len(numbers)))]
    cut = int(rng.integers(1, len(text)))
    dropped = lines.copy()
    fields = dropped[k].split()
    if len(fields) > 1:
        del fields[int(rng.integers(len(fields)))]
    dropped[k] = " ".join(fields) + "\n"
    garbage = bytes(rng.integers(32, 127, size=40, dtype=np.uint8)).decode()
    return [
        text[:cut],  # truncated
        "".join(dropped),  # a column missing on one line
        text[:a] + "nan" + text[b:],  # NaN
        text[:a] + "inf" + text[b:],  # inf
        text[:cut] + garbage + text[cut:],  # garbage in the middle
        "",  # empty
    ]


@pytest.mark.parametrize("seed", range(N_CASES))
def test_fuzz_extxyz(seed, tmp_path):
    rng = np.random.default_rng(seed)
    good = tmp_path / "good.extxyz"
    frames = [cu_frame(1, seed=s) for s in range(3)]
    write(good, [f.to_atoms() for f in frames], format="extxyz")
    text = good.read_text()
    for k, bad in enumerate(_text_mutations(text, rng)):
        path = tmp_path / f"bad{k}.extxyz"
        path.write_text(bad)
        _check(path, "extxyz")
    # duplicated atom (same position twice)
    f = frames[0]
    f.positions[1] = f.positions[0]
    dup = tmp_path / "dup.extxyz"
    write(dup, [f.to_atoms()], format="extxyz")
    assert _check(dup, "extxyz") == "error"


def _write_deepmd(root: Path) -> None:
    import dpdata

    frames = [cu_frame(1, seed=s) for s in range(4)]
    system = dpdata.LabeledSystem()
    for f in frames:
        system.append(dpdata.LabeledSystem(f.to_atoms(), fmt="ase/structure"))
    system.to("deepmd/npy", str(root))


@pytest.mark.parametrize("seed", range(N_CASES))
def test_fuzz_deepmd_npy(seed, tmp_path):
    rng = np.random.default_rng(seed)
    good = tmp_path / "good"
    _write_deepmd(good)
    assert _check(good, "deepmd/npy") == "read"
    names = sorted(p.name for p in (good / "set.000").glob("*.npy"))
    for kind in ("nan", "shape", "truncate", "garbage", "missing"):
        bad = tmp_path / f"bad_{kind}"
        shutil.copytree(good, bad)
        target = bad / "set.000" / names[int(rng.integers(len(names)))]
        arr = np.load(target)
        if kind == "nan":
            arr = arr.astype(np.float64)
            arr.reshape(-1)[int(rng.integers(arr.size))] = np.nan
            np.save(target, arr)
        elif kind == "shape":
            np.save(target, arr.reshape(-1)[: max(arr.size - 1, 1)])
        elif kind == "truncate":
            data = target.read_bytes()
            target.write_bytes(data[: int(rng.integers(1, len(data)))])
        elif kind == "garbage":
            target.write_bytes(bytes(rng.integers(0, 256, size=200, dtype=np.uint8)))
        else:
            target.unlink()
        _check(bad, "deepmd/npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        read_frames(tmp_path / "empty", "deepmd/npy")


@pytest.mark.parametrize("seed", range(4))
def test_fuzz_pwmat_movement(seed, shared_data, tmp_path):
    text = (shared_data / "cu_pwmat" / "0_300_MOVEMENT").read_text()
    # keep the first two frames (frames start with a line holding "atoms,Iteration")
    starts = [m.start() for m in re.finditer(r"^.*atoms,Iteration", text, flags=re.M)]
    text = text[: starts[2]]
    rng = np.random.default_rng(seed)
    good = tmp_path / "MOVEMENT"
    good.write_text(text)
    assert _check(good, "pwmat/movement") == "read"
    for k, bad in enumerate(_text_mutations(text, rng)):
        path = tmp_path / f"bad{k}_MOVEMENT"
        path.write_text(bad)
        _check(path, "pwmat/movement")
