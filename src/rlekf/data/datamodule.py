"""``AtomsDataModule``: reads frames, splits them, builds neighbour lists, serves batches.

Splits (``split=``):
- ``random``: frames drawn at random (only for decorrelated snapshots);
- ``blocks``: each file cut into ``n_blocks`` contiguous time blocks, whole blocks assigned to
  train/val/test (MD trajectories: consecutive frames never straddle two splits);
- ``files``: whole files assigned to splits;
- ``none``: every frame of ``path`` is training data; ``val_path``/``test_path`` give the others.
Explicit ``val_path``/``test_path`` always win over the fractions; ``val_frames``/``test_frames``
keep a range of their frames (e.g. two ranges of one file, apart by a gap). ``strata > 1``
(``random`` and ``blocks``) cuts each file into that many equal consecutive parts (conditions,
e.g. the temperatures of the generated EMT set) and gives validation and test the same share
of every part. The split is written to ``<split_dir>/split.json`` and re-used from there (so a
resumed run sees the same split).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from rlekf.data import keys as K
from rlekf.data.dataset import AtomsDataset, GroupedBatchSampler, collate_atoms
from rlekf.data.io import atomic_write_bytes
from rlekf.data.neighbors import auto_sel, max_neighbor_counts, parse_sel
from rlekf.data.readers import DataError, Frame, apply_type_map, read_frames_with_report
from rlekf.data.stats import energy_bias, env_statistics

__all__ = ["AtomsDataModule", "split_frames"]

log = logging.getLogger(__name__)

PathLike = str | os.PathLike


def _as_list(path: PathLike | Sequence[PathLike] | None) -> list[str]:
    if path is None:
        return []
    if isinstance(path, (str, os.PathLike)):
        return [str(path)]
    return [str(p) for p in path]


def _held_out_counts(
    n_units: int, val_fraction: float, test_fraction: float, what: str
) -> tuple[int, int]:
    """Units for validation and test out of ``n_units`` (at least one each when asked for)."""
    n_val = int(round(val_fraction * n_units)) if val_fraction > 0 else 0
    n_test = int(round(test_fraction * n_units)) if test_fraction > 0 else 0
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if test_fraction > 0:
        n_test = max(n_test, 1)
    if n_val + n_test >= n_units:
        raise DataError(
            f"cannot split {what} into train/val/test with val_fraction={val_fraction}, "
            f"test_fraction={test_fraction}: the training split would be empty; add data, "
            "lower the fractions or give val_path/test_path"
        )
    return n_val, n_test


def split_frames(
    frames: Sequence[Frame],
    mode: str,
    val_fraction: float,
    test_fraction: float,
    n_blocks: int,
    seed: int,
    strata: int = 1,
) -> dict[str, list[int]]:
    """Indices of ``frames`` for train/val/test according to ``mode`` (see module docstring).

    Args:
        strata: for ``random`` and ``blocks``, cut the frames of each file into this many
            equal consecutive parts and hold out ``val_fraction``/``test_fraction`` of the
            units (frames or blocks) of every part; ``n_blocks`` is then per part.
    """
    n = len(frames)
    rng = np.random.default_rng(seed)
    if isinstance(strata, bool) or not isinstance(strata, int) or strata < 1:
        raise ValueError(f"strata must be an integer >= 1, got {strata!r}")
    if mode == "none":
        return {"train": list(range(n)), "val": [], "test": []}
    if mode not in ("random", "blocks", "files"):
        raise ValueError(f"split must be one of random, blocks, files, none; got {mode!r}")
    if strata > 1 and mode == "files":
        raise ValueError(f"strata={strata} applies to split=random or blocks, not {mode!r}")
    by_source: dict[str, list[int]] = {}
    for i, f in enumerate(frames):
        by_source.setdefault(f.source, []).append(i)
    # groups of units; validation and test take their share of every group
    groups: list[tuple[str, list[list[int]]]] = []
    if strata == 1:
        if mode == "random":
            units = [[i] for i in range(n)]
        elif mode == "files":
            units = list(by_source.values())
        else:
            units = [
                chunk.tolist()
                for idx in by_source.values()
                for chunk in np.array_split(np.asarray(idx), min(n_blocks, len(idx)))
            ]
        groups.append((f"{n} frames in {len(units)} {mode} units", units))
    else:
        for source, idx in by_source.items():
            if len(idx) < strata:
                raise DataError(f"{source}: {len(idx)} frames cannot form strata={strata} parts")
            for k, part in enumerate(np.array_split(np.asarray(idx), strata)):
                if mode == "random":
                    units = [[int(i)] for i in part]
                else:
                    units = [c.tolist() for c in np.array_split(part, min(n_blocks, len(part)))]
                what = f"part {k + 1}/{strata} of {source} ({len(part)} frames)"
                groups.append((what, units))
    val: list[int] = []
    test: list[int] = []
    train: list[int] = []
    for what, units in groups:
        n_val, n_test = _held_out_counts(len(units), val_fraction, test_fraction, what)
        order = rng.permutation(len(units)).tolist()
        val += [i for u in order[:n_val] for i in units[u]]
        test += [i for u in order[n_val : n_val + n_test] for i in units[u]]
        train += [i for u in order[n_val + n_test :] for i in units[u]]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def _frame_range(spec: Any, name: str) -> tuple[int, int] | None:
    """``[start, stop]`` or ``"start:stop"`` (0-based, stop excluded) -> ``(start, stop)``."""
    if spec is None:
        return None
    parts = spec.split(":") if isinstance(spec, str) else list(spec)
    try:
        start, stop = (int(x) for x in parts)
    except (TypeError, ValueError):
        raise ValueError(
            f"data.{name} must be [start, stop] or 'start:stop' (frame indices), got {spec!r}"
        ) from None
    if not 0 <= start < stop:
        raise ValueError(f"data.{name} needs 0 <= start < stop, got {spec!r}")
    return start, stop


class AtomsDataModule(L.LightningDataModule):
    """Atomic frames for training a force field.

    Args:
        path: file(s) or directory(ies) of labelled frames (any format of
            :func:`~rlekf.data.readers.read_frames`).
        type_map: element symbols of the model, in type order.
        rcut: model cutoff (Å), for the neighbour lists.
        sel: neighbour slots per type (the model's ``sel``), or ``"auto"`` / ``"auto:RATIO"``:
            chosen in :meth:`setup` from the training frames like DeePMD-kit's ``sel: auto``
            (largest count of each type within ``rcut`` × RATIO (default 1.1), rounded up to a
            multiple of 4; :func:`~rlekf.data.neighbors.auto_sel`); read it back from
            :attr:`sel` or :meth:`resolve_sel`. :attr:`sel_info` records how it was chosen.
        rcut_smth: model switching start (Å), for the descriptor statistics.
        fmt: reader format, ``auto`` by default.
        val_path: explicit validation data (overrides ``val_fraction``).
        test_path: explicit test data (overrides ``test_fraction``).
        val_frames: keep only frames ``[start, stop)`` of ``val_path`` (``[start, stop]`` or
            ``"start:stop"``; indices over the frames of all ``val_path`` files in order;
            unused without ``val_path``).
        test_frames: the same for ``test_path``. Validation and test frames may come from one
            file but must not overlap, and neither may be a training file.
        split: ``random`` | ``blocks`` | ``files`` | ``none``.
        val_fraction: share of split units for validation.
        test_fraction: share of split units for testing.
        n_blocks: contiguous blocks per file (per part when ``strata > 1``) for
            ``split=blocks``.
        strata: equal consecutive parts per file that validation and test each sample
            (``split=random|blocks``; 1 = none).
        batch_size: training frames per batch (frames of one batch share an atom count).
        eval_batch_size: frames per validation/test batch.
        use_virial: read virial labels when the format has them.
        on_error: ``raise`` (default) or ``skip`` bad frames (counted and reported).
        max_frames: keep only the first ``max_frames`` frames of ``path`` (quick runs).
        seed: seeds the split and the shuffling.
        split_dir: where ``split.json`` is written and re-read.
        stats_frames: at most this many training frames are used for descriptor statistics.
        num_workers: DataLoader workers.
        dtype: float dtype of positions and labels (``float64``/``float32``).
    """

    def __init__(
        self,
        *,
        path: PathLike | Sequence[PathLike],
        type_map: Sequence[str],
        rcut: float,
        sel: Sequence[int] | str,
        rcut_smth: float = 0.5,
        fmt: str = "auto",
        val_path: PathLike | Sequence[PathLike] | None = None,
        test_path: PathLike | Sequence[PathLike] | None = None,
        val_frames: Sequence[int] | str | None = None,
        test_frames: Sequence[int] | str | None = None,
        split: str = "random",
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        n_blocks: int = 10,
        strata: int = 1,
        batch_size: int = 1,
        eval_batch_size: int = 8,
        use_virial: bool = True,
        on_error: str = "raise",
        max_frames: int | None = None,
        seed: int = 0,
        split_dir: PathLike | None = None,
        stats_frames: int = 200,
        num_workers: int = 0,
        dtype: str = "float64",
    ) -> None:
        super().__init__()
        self.paths = _as_list(path)
        self.val_paths = _as_list(val_path)
        self.test_paths = _as_list(test_path)
        if not self.paths:
            raise ValueError("data.path is empty: give a file or directory of labelled frames")
        self.type_map = list(type_map)
        self.rcut = float(rcut)
        self.rcut_smth = float(rcut_smth)
        self.sel_ratio = parse_sel(sel)
        self.sel: list[int] | str = (
            str(sel) if self.sel_ratio is not None else [int(s) for s in sel]
        )
        self.sel_info: dict[str, Any] | None = None
        self.fmt = fmt
        self.split = split
        self.val_fraction = float(val_fraction)
        self.test_fraction = float(test_fraction)
        self.n_blocks = int(n_blocks)
        self.strata = int(strata)
        self.val_frames = _frame_range(val_frames, "val_frames")
        self.test_frames = _frame_range(test_frames, "test_frames")
        self._check_held_out_files()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.use_virial = use_virial
        self.on_error = on_error
        self.max_frames = max_frames
        self.seed = int(seed)
        self.split_dir = Path(split_dir) if split_dir is not None else None
        self.stats_frames = int(stats_frames)
        self.num_workers = int(num_workers)
        self.dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.datasets: dict[str, AtomsDataset] = {}
        self.skipped: int = 0
        self._stats: dict[str, Any] | None = None
        # (epoch, batches already trained) when resuming in the middle of an epoch
        self.resume_position: tuple[int, int] | None = None

    # ------------------------------------------------------------------ reading
    def _read(self, paths: list[str]) -> list[Frame]:
        frames, report = read_frames_with_report(
            paths, self.fmt, use_virial=self.use_virial, on_error=self.on_error
        )
        self.skipped += report.n_skipped
        return frames

    def _check_held_out_files(self) -> None:
        """Validation/test files are not training files, and test frames are not validation's."""
        train = {Path(p).resolve() for p in self.paths}
        for name, paths in (("val_path", self.val_paths), ("test_path", self.test_paths)):
            both = sorted(str(p) for p in {Path(q).resolve() for q in paths} & train)
            if both:
                raise ValueError(f"data.{name} {both} is also in data.path (training data)")
        same = {Path(p).resolve() for p in self.val_paths} & {
            Path(p).resolve() for p in self.test_paths
        }
        if same:
            v, t = self.val_frames, self.test_frames
            if v is None or t is None or (v[0] < t[1] and t[0] < v[1]):
                raise ValueError(
                    f"the test frames overlap the validation frames in {sorted(map(str, same))}: "
                    f"give disjoint data.val_frames and data.test_frames (got {v}, {t})"
                )

    def _read_range(self, paths: list[str], rng_: tuple[int, int] | None, name: str):
        frames = self._read(paths)
        if rng_ is None:
            return frames
        start, stop = rng_
        if stop > len(frames):
            raise DataError(
                f"data.{name}={list(rng_)} asks for frames up to {stop - 1} but {paths} "
                f"hold {len(frames)} frames"
            )
        return frames[start:stop]

    def _resolve_split(self, frames: list[Frame]) -> dict[str, list[int]]:
        split_file = self.split_dir / "split.json" if self.split_dir else None
        keys = [[f.source, f.index] for f in frames]
        if split_file is not None and split_file.exists():
            saved = json.loads(split_file.read_text())
            lookup = {(s, i): k for k, (s, i) in enumerate(keys)}
            try:
                return {
                    name: [lookup[(s, i)] for s, i in saved[name]]
                    for name in ("train", "val", "test")
                }
            except KeyError as exc:
                raise DataError(
                    f"{split_file} names frame {exc} that is not in the data any more; "
                    "delete the file to make a new split"
                ) from exc
        mode = self.split
        val_f = 0.0 if self.val_paths else self.val_fraction
        test_f = 0.0 if self.test_paths else self.test_fraction
        if mode == "none":
            val_f = test_f = 0.0
        strata = 1 if mode == "none" else self.strata
        idx = split_frames(frames, mode, val_f, test_f, self.n_blocks, self.seed, strata)
        if split_file is not None:
            payload = {name: [keys[i] for i in idx[name]] for name in ("train", "val", "test")}
            atomic_write_bytes(split_file, json.dumps(payload).encode())
        return idx

    def setup(self, stage: str | None = None) -> None:
        """Read, split and build neighbour lists once (idempotent)."""
        if self.datasets:
            return
        frames = self._read(self.paths)
        if self.max_frames is not None:
            frames = frames[: self.max_frames]
        idx = self._resolve_split(frames)
        parts: dict[str, list[Frame]] = {k: [frames[i] for i in v] for k, v in idx.items()}
        if self.val_paths:
            parts["val"] = self._read_range(self.val_paths, self.val_frames, "val_frames")
        if self.test_paths:
            parts["test"] = self._read_range(self.test_paths, self.test_frames, "test_frames")
        if not parts["train"]:
            raise DataError(f"the training split of {self.paths} is empty")
        if self.sel_ratio is not None:
            self._choose_sel(parts["train"])
        if not parts["val"]:
            raise DataError(
                f"the validation split of {self.paths} is empty: set data.val_fraction > 0, "
                "data.val_path, or a split mode other than 'none'"
            )
        test_is_val = not parts["test"]
        if test_is_val:
            log.warning("no test split: the test stage uses the validation frames")
            del parts["test"]
        ids = {"train": idx["train"], "val": idx["val"], "test": idx["test"]}
        for name, fr in parts.items():
            frame_ids = ids[name] if len(ids[name]) == len(fr) else None
            self.datasets[name] = AtomsDataset(
                fr, self.type_map, self.rcut, self.sel, frame_ids, self.dtype
            )
        if test_is_val:
            self.datasets["test"] = self.datasets["val"]
        if self.skipped:
            log.warning("skipped %d bad frame(s) while reading (on_error=skip)", self.skipped)
        counts = {k: len(v) for k, v in self.datasets.items()}
        log.info(
            "frames per split: %s; max neighbours per type in training data: %s (sel=%s)",
            counts,
            self.datasets["train"].max_neighbors.tolist(),
            self.sel,
        )

    def _choose_sel(self, frames: list[Frame]) -> None:
        """``sel=auto``: per-type largest neighbour count over ``frames``, with the margin."""
        nt = len(self.type_map)
        largest = np.zeros(nt, dtype=np.int64)
        for f in frames:
            types = apply_type_map(f.numbers, self.type_map, f.source, f.index)
            counts = max_neighbor_counts(f.positions, f.cell, f.pbc, types, self.rcut, nt)
            largest = np.maximum(largest, counts)
        sel = auto_sel(largest, self.sel_ratio)
        self.sel_info = {
            "rule": f"auto:{self.sel_ratio:g}",
            "max_neighbors": largest.tolist(),
            "frames": len(frames),
            "sel": sel,
        }
        self.sel = sel
        per_type = dict(zip(self.type_map, largest.tolist(), strict=True))
        log.info(
            "sel=auto: largest neighbour count per type within rcut=%s Å over %d training "
            "frames %s x %g, rounded up to a multiple of 4 -> sel %s",
            self.rcut,
            len(frames),
            per_type,
            self.sel_ratio,
            sel,
        )

    def resolve_sel(self) -> list[int]:
        """The neighbour slots per type; with ``sel=auto`` reads the data to choose them."""
        if isinstance(self.sel, str):
            self.setup("fit")
        return list(self.sel)

    def state_dict(self) -> dict[str, Any]:
        """Stored in the checkpoint by Lightning: how ``sel=auto`` chose ``sel`` (else empty)."""
        return {"sel_auto": dict(self.sel_info)} if self.sel_info else {}

    # ------------------------------------------------------------------ statistics
    def stats(self) -> dict[str, Any]:
        """Energy bias (ntypes,) eV, env_avg/env_std (ntypes, 4), max_neighbors (ntypes,)."""
        if self._stats is None:
            self.setup("fit")
            train = self.datasets["train"]
            nt = len(self.type_map)
            counts = np.stack(
                [np.bincount(it[K.TYPES].numpy(), minlength=nt) for it in train.items]
            )
            energies = np.array([float(it[K.ENERGY][0]) for it in train.items])
            rng = np.random.default_rng(self.seed)
            pick = np.sort(rng.permutation(len(train))[: self.stats_frames])
            avg, std = env_statistics(
                [train.items[i] for i in pick], nt, self.rcut_smth, self.rcut
            )
            self._stats = {
                "energy_bias": energy_bias(energies, counts),
                "env_avg": avg,
                "env_std": std,
                "max_neighbors": train.max_neighbors,
                "has_virial": train.has_virial,
            }
        return self._stats

    # ------------------------------------------------------------------ loaders
    def _loader(self, name: str, batch_size: int, shuffle: bool) -> DataLoader:
        ds = self.datasets[name]
        sampler = GroupedBatchSampler(ds.n_atoms, batch_size, shuffle=shuffle, seed=self.seed)
        return DataLoader(
            ds,
            batch_sampler=sampler,
            collate_fn=collate_atoms,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        loader = self._loader("train", self.batch_size, shuffle=True)
        if self.resume_position is not None:
            # Lightning may build the loader more than once while restoring: keep the position;
            # the sampler applies it once, to the matching epoch only
            loader.batch_sampler.resume_from(*self.resume_position)
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
