"""``read_frames``: expand the paths, read each with its backend, validate, report skips."""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rlekf.data.frames import DataError, DataWarning, Frame, PathLike
from rlekf.data.readers.ase_backend import iter_ase
from rlekf.data.readers.deepmd import deepmd_systems
from rlekf.data.readers.dpdata_backend import iter_dpdata
from rlekf.data.readers.resolve import expand_paths, resolve_format
from rlekf.data.readers.validate import validate_frame

__all__ = ["ReadReport", "SkippedFrame", "read_frames", "read_frames_with_report"]


@dataclass
class SkippedFrame:
    """A frame dropped by ``on_error="skip"``.

    Attributes:
        source: File the frame belongs to.
        index: Frame index in ``source`` (for an unreadable tail: the first unreadable frame).
        reason: Short category of the problem.
        message: Full :class:`DataError` message.
    """

    source: str
    index: int | None
    reason: str
    message: str


@dataclass
class ReadReport:
    """What a call to :func:`read_frames_with_report` read and skipped.

    Attributes:
        files: Files or system directories read, in order.
        frames_per_file: Number of frames kept from each file.
        skipped: Frames dropped with ``on_error="skip"``.
    """

    files: list[str] = field(default_factory=list)
    frames_per_file: dict[str, int] = field(default_factory=dict)
    skipped: list[SkippedFrame] = field(default_factory=list)

    @property
    def n_read(self) -> int:
        """Number of frames kept."""
        return sum(self.frames_per_file.values())

    @property
    def n_skipped(self) -> int:
        """Number of frames (or unreadable file tails) skipped."""
        return len(self.skipped)

    def reasons(self) -> Counter[str]:
        """Count skipped frames per reason."""
        return Counter(s.reason for s in self.skipped)

    def summary(self) -> str:
        """One-line human-readable summary of kept and skipped frames."""
        text = f"read {self.n_read} frames from {len(self.files)} file(s)"
        if self.skipped:
            reasons = ", ".join(f"{r}: {n}" for r, n in self.reasons().most_common())
            first = self.skipped[0].message
            text += f", skipped {self.n_skipped} ({reasons}); first: {first}"
        return text


def read_frames(
    path: PathLike | Sequence[PathLike],
    fmt: str = "auto",
    *,
    use_virial: bool = True,
    on_error: str = "raise",
) -> list[Frame]:
    """Read and validate labelled frames from one or more files.

    Args:
        path: A file, a deepmd/npy directory, a glob pattern, or a list of these (read in order
            and concatenated; glob matches are sorted naturally).
        fmt: ``"auto"``, ``"deepmd/npy"``, ``"pwmat/movement"``, ``"vasp/outcar"``,
            ``"vasp/xml"``, ``"extxyz"``, ``"dpdata:<fmt>"`` or any ASE format name (optionally
            prefixed ``"ase:"``). Applies to every path.
        use_virial: If False, every frame's ``virial`` is ``None`` (e.g. for PWmat Cu, whose
            virials are unphysical).
        on_error: ``"raise"`` raises :class:`DataError` on the first bad frame; ``"skip"`` drops
            bad frames, counts them in the report and emits one :class:`DataWarning`.
            File-level problems (missing, empty, unreadable file) always raise.

    Returns:
        The frames, in file order.

    Raises:
        DataError: Missing/empty/unreadable file, no frames, or an invalid frame
            (with ``on_error="raise"``).
    """
    frames, _ = read_frames_with_report(path, fmt, use_virial=use_virial, on_error=on_error)
    return frames


def read_frames_with_report(
    path: PathLike | Sequence[PathLike],
    fmt: str = "auto",
    *,
    use_virial: bool = True,
    on_error: str = "raise",
) -> tuple[list[Frame], ReadReport]:
    """Like :func:`read_frames` but also return a :class:`ReadReport`.

    Args:
        path: See :func:`read_frames`.
        fmt: See :func:`read_frames`.
        use_virial: See :func:`read_frames`.
        on_error: See :func:`read_frames`.

    Returns:
        ``(frames, report)``.

    Raises:
        DataError: See :func:`read_frames`.
        ValueError: If ``on_error`` is neither ``"raise"`` nor ``"skip"``.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    report = ReadReport()
    frames: list[Frame] = []
    for p in expand_paths(path):
        frames.extend(_read_path(p, fmt, use_virial, on_error, report))
    if report.skipped:
        warnings.warn(report.summary(), DataWarning, stacklevel=3)
    return frames, report


def _read_path(
    path: Path, fmt: str, use_virial: bool, on_error: str, report: ReadReport
) -> list[Frame]:
    """Read and validate all frames of one path, recording results in ``report``."""
    backend, name = resolve_format(path, fmt)
    if path.is_dir() and backend != "deepmd":
        raise DataError(
            f"is a directory but format {fmt!r} expects a file",
            source=path,
            hint="use fmt='deepmd/npy' for DeePMD system directories or pass the file itself",
            reason="unreadable file",
        )
    if backend == "deepmd":
        if not path.is_dir():
            raise DataError(
                "deepmd/npy data must be a directory holding type.raw and set.* folders",
                source=path,
                hint="pass the system directory (or its parent), or choose another fmt",
                reason="unreadable file",
            )
        frames: list[Frame] = []
        for sysdir in deepmd_systems(path):
            frames.extend(
                _collect(iter_dpdata(sysdir, "deepmd/npy", use_virial), sysdir, on_error, report)
            )
        return frames
    if path.stat().st_size == 0:
        raise DataError(
            "file is empty (0 bytes)",
            source=path,
            hint="the file was probably not written completely; regenerate or remove it",
            reason="empty file",
        )
    if backend == "dpdata":
        assert name is not None
        return _collect(iter_dpdata(path, name, use_virial), path, on_error, report)
    return _collect(iter_ase(path, name, use_virial), path, on_error, report)


def _collect(
    items: Iterator[Frame | DataError], source: Path, on_error: str, report: ReadReport
) -> list[Frame]:
    """Validate frames from ``items``; raise or record errors according to ``on_error``."""
    frames: list[Frame] = []
    seen = 0
    for item in items:
        seen += 1
        err = item if isinstance(item, DataError) else None
        if err is None:
            assert isinstance(item, Frame)
            try:
                validate_frame(item)
            except DataError as exc:
                err = exc
        if err is not None:
            if on_error == "raise" or err.index is None:
                raise err
            report.skipped.append(SkippedFrame(str(source), err.index, err.reason, str(err)))
            continue
        frames.append(item)  # type: ignore[arg-type]
    if seen == 0:
        raise DataError(
            "contains no frames",
            source=source,
            hint="check that the file is complete and that fmt is right",
            reason="no frames",
        )
    report.files.append(str(source))
    report.frames_per_file[str(source)] = len(frames)
    return frames
