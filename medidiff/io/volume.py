"""Reading and writing medical volumes without losing their geometry.

A :class:`Volume` is a 3D array in its on-disk voxel order plus the 4x4 affine that maps
voxel indices ``(i, j, k)`` to world coordinates in millimetres in the RAS+ convention
(+x = Left->Right, +y = Posterior->Anterior, +z = Inferior->Superior), which is NIfTI's
convention. Files written by medidiff carry the same affine, spacing and qform/sform
codes, so a map overlays its input exactly in ITK-SNAP, 3D Slicer or FSLeyes.

Formats read (chosen by suffix; a folder is a DICOM series):

=====================  =========  ==========================================
suffix                 format     reader
=====================  =========  ==========================================
``.nii`` ``.nii.gz``   nifti      nibabel (NIfTI-1 and NIfTI-2)
``.mgh`` ``.mgz``      mgh        nibabel (FreeSurfer; affine is RAS already)
``.nrrd`` ``.nhdr``    nrrd       SimpleITK
``.mha`` ``.mhd``      mha        SimpleITK (MetaImage)
``.dcm``, a folder     dicom      SimpleITK/GDCM (one file, or a series folder)
=====================  =========  ==========================================

A file with another or no suffix is read as DICOM when it carries the DICOM Part-10
marker (``DICM`` at byte 128); anything else is an "unsupported format" error.

SimpleITK works in LPS+ (ITK/DICOM convention); its geometry and arrays are converted to
RAS and ``(x, y, z)`` order (see :mod:`medidiff.io.itk`).

The readers live in :mod:`medidiff.io.nifti` (nibabel), :mod:`medidiff.io.itk`
(SimpleITK) and :mod:`medidiff.io.dicom` (DICOM files and series); what they share
(errors, the read plan, quiet readers) in :mod:`medidiff.io.reading`; atomic writing in
:mod:`medidiff.io.atomic`. This module holds the :class:`Volume` type and the
format-dispatching :func:`load_volume` / :func:`save_volume`.

Decisions (the same for every reader):

- **2D data** (a 2D NIfTI, a 2D NRRD/MHA) is promoted to a volume of depth 1,
  ``(X, Y, 1)``, keeping the affine's third column (SimpleITK already reads a single
  DICOM slice that way). Data with trailing singleton axes beyond the third
  (``(X, Y, Z, 1)``, ``(X, Y, Z, 1, 1)``) is 3D.
- **4D data** ``(X, Y, Z, T)`` is an error unless ``volume_index`` picks one volume
  (for NIfTI/MGH only that volume is read) or ``allow_4d=True`` keeps all of it.
  5D and higher, 1D, multi-component (RGB, vector) and complex voxels are errors.
- **DICOM**: a folder is one series (several series need ``series_uid``); irregular
  slice positions are an error; GDCM's pixel quirks are undone or flagged (see
  :mod:`medidiff.io.dicom`).
- **Size guard**: the shape is read from the header first; data needing more than
  ``MEDIDIFF_MAX_VOXEL_BYTES`` bytes (default 8 GiB) is refused before allocation.
- **Arrays** are in native byte order (torch cannot take big-endian arrays). Scaled NIfTI
  data (``scl_slope``/``scl_inter``) is returned scaled, as nibabel does.

Every problem is a :class:`~medidiff.errors.VolumeError` (file level) or
:class:`~medidiff.errors.VolumeContentError` (content level) whose message starts with
the path; the exception's ``reason`` attribute is a short code for grouping (one of
:data:`ERROR_REASONS`).

Example:
    >>> import numpy as np, tempfile, os
    >>> from medidiff.io import Volume, load_volume, save_volume
    >>> vol = Volume(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    >>> path = os.path.join(tempfile.mkdtemp(), "x.nii.gz")
    >>> _ = save_volume(vol, path)
    >>> load_volume(path).spacing
    (2.0, 2.0, 3.0)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import VolumeContentError, VolumeError
from medidiff.io.dicom import has_dicom_marker, read_dicom_file, read_dicom_folder
from medidiff.io.itk import read_sitk_file
from medidiff.io.nifti import NIFTI_SUFFIXES, read_nibabel, write_nifti
from medidiff.io.reading import (
    ERROR_REASONS,
    RawRead,
    dedupe,
    quiet_readers,
    volume_error,
)

# suffix -> format; longest suffixes first so ".nii.gz" wins over ".gz"
_FORMAT_BY_SUFFIX: dict[str, str] = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".mgz": "mgh",
    ".mgh": "mgh",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "mha",
    ".mhd": "mha",
    ".dcm": "dicom",
}

#: Suffixes of files that hold a whole volume (what :func:`is_volume_path` accepts). A
#: ``.dcm`` file is left out: it is usually one slice of a series, whose folder is the
#: volume.
VOLUME_SUFFIXES: tuple[str, ...] = (
    ".nii",
    ".nii.gz",
    ".mgh",
    ".mgz",
    ".nrrd",
    ".nhdr",
    ".mha",
    ".mhd",
)

# Formats people try that medidiff does not read, to say what the file is.
_KNOWN_UNSUPPORTED: dict[str, str] = {
    ".hdr": "Analyze / NIfTI-pair files",
    ".img": "Analyze / NIfTI-pair files",
    ".mnc": "MINC files",
    ".par": "Philips PAR/REC files",
    ".rec": "Philips PAR/REC files",
    ".head": "AFNI files",
    ".brik": "AFNI files",
    ".brik.gz": "AFNI files",
    ".v": "ECAT files",
    ".trk": "streamline files",
    ".tck": "streamline files",
    ".gii": "GIFTI surfaces",
    ".png": "2D pictures",
    ".jpg": "2D pictures",
    ".jpeg": "2D pictures",
    ".tif": "2D pictures",
    ".tiff": "2D pictures",
}

# --------------------------------------------------------------------------- the type


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D scan with its geometry.

    Attributes:
        array: voxel values, shape ``(X, Y, Z)`` in the file's own voxel order
            (``(X, Y, Z, T)`` only when loaded with ``allow_4d=True``).
        affine: ``(4, 4)`` float64 voxel-to-world matrix, world in RAS+ millimetres.
        meta: provenance, filled the same way by every reader: ``source`` (path),
            ``format`` ("nifti", "mgh", "nrrd", "mha", "dicom"), ``orientation`` (axis
            codes on disk, e.g. "LPS"), ``dtype`` (on disk), ``disk_shape``, and
            ``warnings`` (list of str); NIfTI adds ``qform_code``, ``sform_code``,
            ``nifti_version``; DICOM adds ``series_uid``, ``n_files``; a picked 4D volume
            adds ``volume_index``.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        affine = np.asarray(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise VolumeContentError(f"affine must be 4x4, got shape {affine.shape}")
        object.__setattr__(self, "affine", affine)
        object.__setattr__(self, "meta", dict(self.meta))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def orientation(self) -> str:
        """Axis codes of the array axes, e.g. ``"RAS"`` or ``"LPS"`` (``?`` if degenerate)."""
        return _axcodes(self.affine)

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A volume on the same grid (same affine) holding ``array``."""
        array = np.asarray(array)
        if array.shape[:3] != self.array.shape[:3]:
            raise VolumeContentError(
                f"array shape {array.shape} does not match the grid {self.array.shape}"
            )
        return replace(self, array=array, meta={**self.meta, **meta})

    def __repr__(self) -> str:
        spacing = ", ".join(f"{s:.4g}" for s in self.spacing)
        return (
            f"Volume(shape={self.shape}, spacing=({spacing}), orientation={self.orientation!r}, "
            f"dtype={self.array.dtype}, source={self.meta.get('source')!r})"
        )


def _axcodes(affine: np.ndarray) -> str:
    import nibabel as nib

    try:
        codes = nib.aff2axcodes(np.asarray(affine, dtype=np.float64))
    except Exception:  # noqa: BLE001 - a degenerate affine has no orientation
        return "???"
    return "".join(c if c is not None else "?" for c in codes)


def check_same_grid(reference: Volume, other: Volume, *, atol: float = 1e-3) -> None:
    """Raise unless ``other`` lies on the grid of ``reference`` (shape and affine).

    Args:
        reference: the volume whose grid is expected.
        other: the volume to check.
        atol: tolerance in mm on the affine entries (files store float32 affines).

    Raises:
        VolumeContentError: the shapes or affines differ; names both sources.
    """
    a = reference.meta.get("source", "reference volume")
    b = other.meta.get("source", "other volume")
    if reference.shape[:3] != other.shape[:3]:
        raise volume_error(
            VolumeContentError,
            "dimensions",
            b,
            f"grid {other.shape[:3]} differs from {a}'s {reference.shape[:3]}; "
            "resample it onto the reference grid first",
        )
    diff = float(np.abs(reference.affine - other.affine).max())
    if diff > atol:
        raise volume_error(
            VolumeContentError,
            "bad-affine",
            b,
            f"affine differs from {a}'s by up to {diff:.4g} mm (tolerance {atol} mm); "
            "the two volumes are not on the same grid",
        )


# --------------------------------------------------------------------------- suffixes


def _suffix_of(name: str) -> str:
    """The longest known suffix of ``name`` (lower case), else its last suffix."""
    lower = name.lower()
    for suffix in (*_FORMAT_BY_SUFFIX, *_KNOWN_UNSUPPORTED):
        if lower.endswith(suffix):
            return suffix
    return Path(lower).suffix


def is_volume_path(path: str | os.PathLike) -> bool:
    """Whether ``path`` ends with a suffix of a whole-volume format medidiff reads.

    Args:
        path: a file name or path (it need not exist).

    Returns:
        True for ``.nii``, ``.nii.gz``, ``.mgh``, ``.mgz``, ``.nrrd``, ``.nhdr``, ``.mha``,
        ``.mhd`` (any case). DICOM files and folders give False: a DICOM series is passed
        as its folder.

    Example:
        >>> is_volume_path("sub-01_T1w.nii.gz"), is_volume_path("notes.txt")
        (True, False)
    """
    return Path(path).name.lower().endswith(VOLUME_SUFFIXES)


def scan_name(path: str | os.PathLike) -> str:
    """The name of the outputs derived from a scan (``NAME_anomaly.nii.gz``, ...).

    A file gives its name without the volume suffix (``sub-01.nii.gz`` -> ``sub-01``). A
    DICOM series folder gives its parent folder's name and its own joined by ``_``
    (``patient7/T1/`` -> ``patient7_T1``): series folders are usually named after the
    sequence (``T1``, ``SE000002``), so the folder name alone would be the same for every
    patient and their outputs would collide. (Names come from the path, never from DICOM
    tags such as PatientID, which would put identifying data into file names.)

    Example:
        >>> import tempfile, pathlib
        >>> series = pathlib.Path(tempfile.mkdtemp()) / "patient7" / "T1"
        >>> series.mkdir(parents=True)
        >>> scan_name("sub-01.nii.gz"), scan_name(series)
        ('sub-01', 'patient7_T1')
    """
    p = Path(os.path.abspath(os.fspath(path)))
    if p.is_dir():
        return f"{p.parent.name}_{p.name}" if p.parent.name else p.name
    return strip_volume_suffix(p.name)


def strip_volume_suffix(name: str | os.PathLike) -> str:
    """``name`` without its volume suffix: ``"a.nii.gz" -> "a"``, ``"b.nrrd" -> "b"``.

    Only known volume suffixes (those of :data:`VOLUME_SUFFIXES` and ``.dcm``) are
    removed, so a folder name such as ``"case.01"`` is kept whole.

    Example:
        >>> strip_volume_suffix("a.nii.gz"), strip_volume_suffix("c.mha"), strip_volume_suffix("d")
        ('a', 'c', 'd')
    """
    text = os.fspath(name)
    lower = text.lower()
    for suffix in _FORMAT_BY_SUFFIX:
        if lower.endswith(suffix) and len(text) > len(suffix):
            return text[: -len(suffix)]
    return text

def _format_of(path: Path) -> str:
    """The reader for ``path``: a format name or ``"dicom-series"``; raises if none."""
    if not path.exists():
        if path.is_symlink():
            raise volume_error(VolumeError, "missing", path, "broken symbolic link")
        raise volume_error(VolumeError, "missing", path, "no such file or folder")
    if path.is_dir():
        return "dicom-series"
    if not path.is_file():
        raise volume_error(VolumeError, "unreadable", path, "not a regular file or folder")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise volume_error(VolumeError, "unreadable", path, f"cannot read ({exc.strerror})") from None
    if size == 0:
        raise volume_error(VolumeError, "empty-file", path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise volume_error(VolumeError, "unreadable", path, "cannot read (permission denied)")
    suffix = _suffix_of(path.name)
    fmt = _FORMAT_BY_SUFFIX.get(suffix)
    if fmt is not None:
        return fmt
    if has_dicom_marker(path):
        return "dicom"
    known = ", ".join(_FORMAT_BY_SUFFIX)
    what = _KNOWN_UNSUPPORTED.get(suffix)
    if what:
        kind = f"{what} ({suffix})"
    elif suffix:
        kind = f"'{suffix}' files"
    else:
        kind = "files without a suffix unless they are DICOM (no DICM marker here)"
    raise volume_error(
        VolumeError,
        "unsupported-format",
        path,
        f"unsupported format: medidiff does not read {kind}; it reads {known}, DICOM files "
        "and DICOM series folders (convert the file to .nii.gz first, e.g. with nibabel)",
    )


# --------------------------------------------------------------------------- loading


def _read(
    path: Path, fmt: str, volume_index: int | None, allow_4d: bool, series_uid: str | None
) -> RawRead:
    if fmt in ("nifti", "mgh"):
        return read_nibabel(path, fmt, volume_index, allow_4d)
    if fmt == "dicom-series":
        return read_dicom_folder(path, series_uid, volume_index, allow_4d)
    if fmt == "dicom":
        return read_dicom_file(path, volume_index, allow_4d)
    return read_sitk_file(path, fmt, volume_index, allow_4d)


def load_volume(
    path: str | os.PathLike,
    *,
    volume_index: int | None = None,
    allow_non_finite: bool = False,
    allow_4d: bool = False,
    series_uid: str | None = None,
) -> Volume:
    """Read a volume with its RAS affine.

    Args:
        path: a NIfTI (``.nii``, ``.nii.gz``), MGH (``.mgh``, ``.mgz``), NRRD (``.nrrd``,
            ``.nhdr``), MetaImage (``.mha``, ``.mhd``) or DICOM file, or a folder holding
            one DICOM series.
        volume_index: for 4D files, which volume to take (negative counts from the end);
            without it 4D data is an error.
        allow_non_finite: accept NaN/Inf voxels instead of raising.
        allow_4d: keep 4D data as ``(X, Y, Z, T)`` instead of raising (for tools that
            describe files, such as ``medidiff info``).
        series_uid: for a DICOM folder holding several series, the SeriesInstanceUID to
            read.

    Returns:
        The :class:`Volume`; ``array`` is ``(X, Y, Z)`` in on-disk voxel order, native
        byte order. Reader warnings (nibabel's log, Python warnings) are collected in
        ``meta["warnings"]`` rather than printed.

    Raises:
        VolumeError: missing, empty, unreadable, corrupt, truncated or unsupported file;
            no or several DICOM series in a folder.
        VolumeContentError: 4D without ``volume_index``, NaN/Inf, zero-size, 1D or 5D
            data, RGB/complex voxels, a degenerate affine, an irregular DICOM series, or
            more than ``MEDIDIFF_MAX_VOXEL_BYTES``.
        ConfigError: ``MEDIDIFF_MAX_VOXEL_BYTES`` is not a number.

    Example:
        >>> import numpy as np, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "v.nii.gz")
        >>> _ = save_volume(Volume(np.ones((3, 4, 5, 2), np.float32), np.eye(4)), p)
        >>> load_volume(p, volume_index=1).shape
        (3, 4, 5)
    """
    path = Path(path).expanduser()
    fmt = _format_of(path)
    messages: list[str] = []
    with quiet_readers(messages, itk=fmt not in ("nifti", "mgh")):
        read = _read(path, fmt, volume_index, allow_4d, series_uid)
    return _finish(read, path, allow_non_finite, messages)


def _load_with_sitk(
    path: str | os.PathLike, *, volume_index: int | None = None, allow_non_finite: bool = False
) -> Volume:
    """Read any SimpleITK-readable file (NIfTI included) through the SimpleITK path.

    For cross-checking the two readers in tests; :func:`load_volume` reads NIfTI with
    nibabel.
    """
    path = Path(path).expanduser()
    fmt = _format_of(path)
    if fmt == "dicom-series":
        return load_volume(path, volume_index=volume_index, allow_non_finite=allow_non_finite)
    if fmt == "mgh":
        raise volume_error(
            VolumeError, "unsupported-format", path, "SimpleITK does not read MGH files"
        )
    messages: list[str] = []
    with quiet_readers(messages, itk=True):
        if fmt == "dicom":
            read = read_dicom_file(path, volume_index, False)
        else:
            read = read_sitk_file(path, fmt, volume_index, False)
    return _finish(read, path, allow_non_finite, messages)


def _checked_affine(affine: Any, path: Path) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise volume_error(
            VolumeContentError,
            "bad-affine",
            path,
            "the affine holds NaN/Inf; the file has no usable geometry",
        )
    det = float(np.linalg.det(affine[:3, :3]))
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    # degenerate: a zero voxel size, or axes (nearly) in one plane; relative to the voxel
    # volume so that sub-micron voxels still pass
    if not abs(det) > 1e-6 * float(np.prod(norms)) or not norms.min() > 0:
        sizes = ", ".join(f"{s:g}" for s in norms)
        raise volume_error(
            VolumeContentError,
            "bad-affine",
            path,
            f"degenerate affine (voxel sizes {sizes} mm, determinant {det:g}); the header's "
            "voxel size or orientation is broken",
        )
    return affine


def _finish(read: RawRead, path: Path, allow_non_finite: bool, messages: list[str]) -> Volume:
    data = read.data
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if data.shape != read.plan.out_shape:
        data = data.reshape(read.plan.out_shape)
    affine = _checked_affine(read.affine, path)
    if data.dtype.kind in "fc":
        finite = np.isfinite(data)
        bad = int(finite.size - np.count_nonzero(finite))
        if bad and not allow_non_finite:
            raise volume_error(
                VolumeContentError,
                "non-finite",
                path,
                f"{bad} NaN/Inf voxels of {data.size}; clean the file or mask them",
            )
    meta = read.meta
    meta.setdefault("source", str(path))
    meta["orientation"] = _axcodes(affine)
    meta["disk_shape"] = read.plan.disk_shape
    if read.plan.volume_index is not None:
        meta["volume_index"] = read.plan.volume_index
    meta["warnings"] = dedupe([*meta.get("warnings", []), *messages])
    return Volume(data, affine, meta)


# --------------------------------------------------------------------------- writing


def save_volume(
    volume: Volume,
    path: str | os.PathLike,
    *,
    dtype: np.dtype | str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``volume`` as NIfTI atomically, keeping affine, spacing and qform/sform codes.

    The qform/sform codes of a NIfTI source are kept when they reproduce the affine;
    otherwise (volumes from other formats, new volumes, an affine a qform cannot hold)
    the sform carries the affine with code 1 (scanner). NIfTI-2 is written when the source
    was NIfTI-2 or a dimension exceeds NIfTI-1's 32767. A round trip returns the same
    values and dtype and the affine rounded to float32 (NIfTI stores the sform in
    float32).

    Args:
        volume: the volume to write.
        path: destination ending in ``.nii`` or ``.nii.gz``.
        dtype: on-disk dtype. Default: the array's dtype, with bool stored as uint8 and
            float64 (or float16) as float32 unless the source file itself was float64.
            Floats written to an integer dtype are rounded, and refused if they do not fit.
        overwrite: replace an existing file (else :class:`OutputError`).

    Returns:
        The written path.

    Raises:
        OutputError: not a NIfTI name, exists without ``overwrite``, values that do not fit
            ``dtype``, or the file cannot be written.
    """
    return write_nifti(
        volume.array, volume.affine, volume.meta, Path(path), dtype=dtype, overwrite=overwrite
    )


__all__ = [
    "ERROR_REASONS",
    "NIFTI_SUFFIXES",
    "VOLUME_SUFFIXES",
    "Volume",
    "check_same_grid",
    "is_volume_path",
    "load_volume",
    "save_volume",
    "scan_name",
    "strip_volume_suffix",
]
