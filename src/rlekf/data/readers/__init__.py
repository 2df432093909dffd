"""Read labelled DFT frames (positions, cell, energy, forces, virial) from disk.

Every reader returns a list of :class:`Frame` objects in a single convention:

* lengths in Å, energies in eV, forces in eV/Å;
* ``cell`` rows are lattice vectors (zeros are allowed along non-periodic directions);
* ``virial`` in eV, DeePMD convention ``virial = -stress * volume`` (positive under compression).

Supported inputs (``fmt``):

* ``"deepmd/npy"``: a DeePMD system directory (holding ``type.raw``) or a directory whose
  sub-directories are such systems, read in natural sort order (``data_0``, ``data_1``, ...).
* ``"pwmat/movement"``: a PWmat ``MOVEMENT`` file (through dpdata). PWmat virials can be wrong
  (the Cu example implies about +136 GPa); read them with ``use_virial=False``.
* ``"dpdata:<fmt>"``: any other dpdata ``LabeledSystem`` format.
* ``"extxyz"``, ``"vasp/outcar"``, ``"vasp/xml"`` or any ASE format name (``"ase:"`` prefix
  optional), read with :func:`ase.io.iread`.
* ``"auto"``: a directory is deepmd/npy, a file whose name contains ``MOVEMENT`` is PWmat,
  ``OUTCAR*`` / ``vasprun*.xml`` are VASP, ``*.xyz`` / ``*.extxyz`` are extxyz, and anything else
  is left to ASE's file-type detection.

Every frame is checked by :func:`validate_frame`; problems raise :class:`DataError` (a
``ValueError``) naming the file and frame, or, with ``on_error="skip"``, are counted in a
:class:`ReadReport` and summarised in one warning.

One concern a module: :mod:`.resolve` (paths and ``fmt``), :mod:`.validate`, the backends
:mod:`.ase_backend` and :mod:`.dpdata_backend`, :mod:`.deepmd` (DeePMD system directories) and
:mod:`.read` (``read_frames``). ``Frame`` and ``DataError`` live in :mod:`rlekf.data.frames`,
the type mapping with the structure-to-batch converter in :mod:`rlekf.data.converter`; this
package re-exports them.
"""

from rlekf.data.converter import apply_type_map, type_map_from_frames
from rlekf.data.frames import DataError, DataWarning, Frame
from rlekf.data.readers.read import (
    ReadReport,
    SkippedFrame,
    read_frames,
    read_frames_with_report,
)
from rlekf.data.readers.resolve import resolve_format
from rlekf.data.readers.validate import MIN_DISTANCE, validate_frame

__all__ = [
    "MIN_DISTANCE",
    "DataError",
    "DataWarning",
    "Frame",
    "ReadReport",
    "SkippedFrame",
    "apply_type_map",
    "read_frames",
    "read_frames_with_report",
    "resolve_format",
    "type_map_from_frames",
    "validate_frame",
]
