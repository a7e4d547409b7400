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

SimpleITK works in LPS+ (ITK/DICOM convention). Its geometry becomes a RAS affine by
``A_ras = diag(-1, -1, 1, 1) @ A_lps`` with ``A_lps[:3, :3] = D @ diag(spacing)`` and
``A_lps[:3, 3] = origin``; its arrays come in ``(z, y, x)`` order and are transposed to
``(x, y, z)`` so that array axes match the affine's voxel axes.

Decisions (the same for every reader):

- **2D data** (a 2D NIfTI, a 2D NRRD/MHA) is promoted to a volume of depth 1,
  ``(X, Y, 1)``, keeping the affine's third column (SimpleITK already reads a single
  DICOM slice that way). Data with trailing singleton axes beyond the third
  (``(X, Y, Z, 1)``, ``(X, Y, Z, 1, 1)``) is 3D.
- **4D data** ``(X, Y, Z, T)`` is an error unless ``volume_index`` picks one volume
  (for NIfTI/MGH only that volume is read) or ``allow_4d=True`` keeps all of it.
  5D and higher, 1D, multi-component (RGB, vector) and complex voxels are errors.
- **DICOM folders** holding several series are an error naming each series UID and
  its number of files; pass ``series_uid`` to pick one. A series whose slice positions
  do not form a regular grid (missing slices, uneven spacing, gantry tilt, several echoes
  in one series) is an error rather than a silently wrong affine. Subfolders are not
  searched. A single DICOM file loads just that file (one slice, or every frame of a
  multi-frame file).
- **DICOM pixel quirks of GDCM**: 1-bit pixels (e.g. SEG objects), which GDCM expands to
  0/255, are returned as their stored 0/1; MONOCHROME1 images come inverted to MONOCHROME2
  (high = bright, GDCM/ITK behaviour), noted in ``meta["warnings"]``; 32-bit Explicit VR
  Big Endian files, which GDCM decodes wrongly, are refused. A file without
  ImagePositionPatient/ImageOrientationPatient or PixelSpacing loads with ITK's defaults
  and a warning saying so.
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
    >>> from medidiff.io.volume import Volume, load_volume, save_volume
    >>> vol = Volume(np.zeros((4, 5, 6), np.float32), np.diag([2.0, 2.0, 3.0, 1.0]))
    >>> path = os.path.join(tempfile.mkdtemp(), "x.nii.gz")
    >>> _ = save_volume(vol, path)
    >>> load_volume(path).spacing
    (2.0, 2.0, 3.0)
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import ConfigError, OutputError, VolumeContentError, VolumeError

NIFTI_SUFFIXES = (".nii", ".nii.gz")

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

_SITK_IMAGE_IO = {
    "nrrd": "NrrdImageIO",
    "mha": "MetaImageIO",
    "dicom": "GDCMImageIO",
    "nifti": "NiftiImageIO",
}

#: Reason codes carried by the ``reason`` attribute of the errors this module raises.
ERROR_REASONS: tuple[str, ...] = (
    "missing",  # no such file or folder
    "empty-file",  # zero bytes
    "unreadable",  # the OS refuses (permissions, not a regular file)
    "unsupported-format",  # suffix/content not a format medidiff reads
    "corrupt",  # the reader failed: corrupt, truncated, or a part is missing
    "dicom-unreadable",  # GDCM reads no image: no pixels (DICOMDIR, SR...), not Part-10, truncated
    "dicom-unsupported",  # an encoding GDCM reads wrongly (32-bit explicit VR big endian)
    "no-voxel-grid",  # e.g. CIFTI: data without a spatial grid
    "too-large",  # over MEDIDIFF_MAX_VOXEL_BYTES
    "4d",  # 4D data where a 3D volume is needed (or a bad volume_index)
    "dimensions",  # 1D, 5D+, zero-size axes
    "multi-component",  # RGB / vector pixels
    "complex",  # complex-valued voxels
    "non-finite",  # NaN / Inf voxels
    "bad-affine",  # non-finite or singular affine
    "dicom-series",  # no series / several series / unknown series UID in a folder
    "dicom-geometry",  # slices of a series not on a regular grid
)

_DEFAULT_MAX_VOXEL_BYTES = 8 * 1024**3
_MAX_VOXEL_BYTES_ENV = "MEDIDIFF_MAX_VOXEL_BYTES"

# RAS = LPS with x and y negated (NIfTI vs ITK/DICOM world conventions).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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
        raise _err(
            VolumeContentError,
            "dimensions",
            b,
            f"grid {other.shape[:3]} differs from {a}'s {reference.shape[:3]}; "
            "resample it onto the reference grid first",
        )
    diff = float(np.abs(reference.affine - other.affine).max())
    if diff > atol:
        raise _err(
            VolumeContentError,
            "bad-affine",
            b,
            f"affine differs from {a}'s by up to {diff:.4g} mm (tolerance {atol} mm); "
            "the two volumes are not on the same grid",
        )


# --------------------------------------------------------------------------- errors


def _err(cls: type[VolumeError], reason: str, path: Any, problem: str) -> VolumeError:
    """An error whose message starts with the path and which carries a ``reason`` code."""
    exc = cls(f"{path}: {problem}")
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


def _short(exc: BaseException, limit: int = 240) -> str:
    """One line from an exception, without ITK's source-file noise."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    picked = next((ln for ln in reversed(lines) if "ERROR" in ln), lines[-1])
    for marker in ("sitk::ERROR:", "ITK ERROR:"):
        if marker in picked:
            picked = picked.split(marker, 1)[1].strip()
    picked = re.sub(r"^\w+\(0x[0-9a-fA-F]+\):\s*", "", picked)  # "GDCMImageIO(0x55..): "
    picked = " ".join(picked.split())
    if len(picked) > limit:
        picked = picked[: limit - 3] + "..."
    return picked


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


def _has_dicom_marker(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _format_of(path: Path) -> str:
    """The reader for ``path``: a format name or ``"dicom-series"``; raises if none."""
    if not path.exists():
        if path.is_symlink():
            raise _err(VolumeError, "missing", path, "broken symbolic link")
        raise _err(VolumeError, "missing", path, "no such file or folder")
    if path.is_dir():
        return "dicom-series"
    if not path.is_file():
        raise _err(VolumeError, "unreadable", path, "not a regular file or folder")
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise _err(VolumeError, "unreadable", path, f"cannot read ({exc.strerror})") from None
    if size == 0:
        raise _err(VolumeError, "empty-file", path, "empty file (0 bytes)")
    if not os.access(path, os.R_OK):
        raise _err(VolumeError, "unreadable", path, "cannot read (permission denied)")
    suffix = _suffix_of(path.name)
    fmt = _FORMAT_BY_SUFFIX.get(suffix)
    if fmt is not None:
        return fmt
    if _has_dicom_marker(path):
        return "dicom"
    known = ", ".join(_FORMAT_BY_SUFFIX)
    what = _KNOWN_UNSUPPORTED.get(suffix)
    if what:
        kind = f"{what} ({suffix})"
    elif suffix:
        kind = f"'{suffix}' files"
    else:
        kind = "files without a suffix unless they are DICOM (no DICM marker here)"
    raise _err(
        VolumeError,
        "unsupported-format",
        path,
        f"unsupported format: medidiff does not read {kind}; it reads {known}, DICOM files "
        "and DICOM series folders (convert the file to .nii.gz first, e.g. with nibabel)",
    )


# --------------------------------------------------------------------------- size and shape


def max_voxel_bytes() -> int:
    """The largest array :func:`load_volume` allocates, in bytes.

    ``MEDIDIFF_MAX_VOXEL_BYTES`` (a number of bytes, e.g. ``17179869184`` or ``16e9``)
    overrides the default of 8 GiB.

    Raises:
        ConfigError: the variable is not a positive number.
    """
    raw = os.environ.get(_MAX_VOXEL_BYTES_ENV, "").strip()
    if not raw:
        return _DEFAULT_MAX_VOXEL_BYTES
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"{_MAX_VOXEL_BYTES_ENV}={raw!r}: expected a positive number of bytes, e.g. 17179869184"
        )
    return value


def _gib(n: int) -> str:
    return f"{n / 1024**3:.3g} GiB"


@dataclass(frozen=True)
class _Plan:
    """What to read, decided from the header shape before any voxel is read."""

    disk_shape: tuple[int, ...]  # as the header gives it, x-fastest (X, Y, Z, T, ...)
    out_shape: tuple[int, ...]  # what the returned array will have: (X, Y, Z[, T])
    index: tuple[Any, ...] | None  # numpy index into the on-disk array (None: all of it)
    volume_index: int | None  # the picked 4D volume, normalised to >= 0


def _plan(
    path: Path, shape: Sequence[int], itemsize: int, volume_index: int | None, allow_4d: bool
) -> _Plan:
    disk = tuple(int(s) for s in shape)
    if any(s < 0 for s in disk):
        raise _err(VolumeError, "corrupt", path, f"negative dimension in header shape {disk}")
    core = list(disk)
    while len(core) > 3 and core[-1] == 1:  # (X, Y, Z, 1, 1) is 3D
        core.pop()
    if len(core) < 2:
        raise _err(
            VolumeContentError,
            "dimensions",
            path,
            f"{len(core)}D data of shape {disk}; an image or volume is needed",
        )
    if 0 in core:
        raise _err(
            VolumeContentError,
            "dimensions",
            path,
            f"empty array of shape {disk} (a zero-size axis)",
        )
    if len(core) > 4:
        raise _err(
            VolumeContentError,
            "dimensions",
            path,
            f"{len(core)}D data of shape {disk}; medidiff reads 3D volumes or one volume "
            "of a 4D file",
        )
    index: tuple[Any, ...] | None = None
    picked: int | None = None
    if len(core) == 4:
        n = core[3]
        if volume_index is not None:
            if not -n <= volume_index < n:
                raise _err(
                    VolumeContentError,
                    "4d",
                    path,
                    f"volume index {volume_index} out of range for {n} volumes (0..{n - 1})",
                )
            picked = volume_index % n
            index = (slice(None),) * 3 + (picked,) + (0,) * (len(disk) - 4)
            out = tuple(core[:3])
        elif allow_4d:
            out = tuple(core)
            if len(disk) > 4:
                index = (slice(None),) * 4 + (0,) * (len(disk) - 4)
        else:
            raise _err(
                VolumeContentError,
                "4d",
                path,
                f"4D data of shape {disk} ({n} volumes) where a 3D volume is needed; "
                "pick one with volume_index (CLI: --volume-index N)",
            )
    else:
        if volume_index is not None and volume_index not in (0, -1):
            raise _err(
                VolumeContentError,
                "4d",
                path,
                f"volume index {volume_index} given but the file holds a single volume",
            )
        if len(core) == 2:  # promoted to depth 1
            out = (core[0], core[1], 1)
        else:
            out = tuple(core)
        if len(disk) > 3:
            index = (slice(None),) * 3 + (0,) * (len(disk) - 3)
    need = math.prod(out) * max(1, int(itemsize))
    limit = max_voxel_bytes()
    if need > limit:
        raise _err(
            VolumeContentError,
            "too-large",
            path,
            f"{'x'.join(map(str, out))} voxels of {itemsize} bytes would need {_gib(need)}, over "
            f"the {_gib(limit)} limit; set {_MAX_VOXEL_BYTES_ENV} higher if this machine has "
            "the memory",
        )
    return _Plan(disk, out, index, picked)


# --------------------------------------------------------------------------- quiet readers


@contextlib.contextmanager
def _captured(messages: list[str]) -> Iterator[None]:
    """Collect reader chatter instead of letting it reach the terminal.

    Python warnings, nibabel's log records and text that native libraries (ITK, GDCM,
    libjpeg, OpenJPEG) write straight to file descriptor 2 are appended to ``messages``;
    so ``medidiff info`` keeps stderr for its one-line error. Only the main thread
    redirects (the redirection is process-wide); other threads read unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import nibabel.imageglobals as nib_globals

    nib_logger = nib_globals.logger
    saved_logging = (nib_logger.handlers[:], nib_logger.propagate)
    native = tempfile.TemporaryFile()
    try:
        nib_logger.handlers = [_ListHandler(messages)]
        nib_logger.propagate = False
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with contextlib.suppress(Exception):
                sys.stderr.flush()
            saved_fd: int | None = None
            try:
                saved_fd = os.dup(2)
                os.dup2(native.fileno(), 2)
            except OSError:
                pass
            try:
                yield
            finally:
                if saved_fd is not None:
                    os.dup2(saved_fd, 2)
                    os.close(saved_fd)
                messages.extend(str(w.message) for w in caught)
    finally:
        nib_logger.handlers, nib_logger.propagate = saved_logging
        native.seek(0)
        text = native.read().decode("utf-8", "replace")
        native.close()
        messages.extend(line.strip() for line in text.splitlines() if line.strip())


class _ListHandler(logging.Handler):
    """A logging handler that appends each message to a list."""

    def __init__(self, messages: list[str]) -> None:
        super().__init__()
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _dedupe(items: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    for item in items:
        item = " ".join(str(item).split())
        if item:
            seen[item] = seen.get(item, 0) + 1
    return [k if n == 1 else f"{k} (x{n})" for k, n in seen.items()]


# --------------------------------------------------------------------------- loading


@dataclass
class _Read:
    """A reader's result before the common checks."""

    data: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any]
    plan: _Plan


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
        byte order.

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
    with _captured(messages):
        if fmt in ("nifti", "mgh"):
            read = _read_nibabel(path, fmt, volume_index, allow_4d)
        elif fmt == "dicom-series":
            read = _read_dicom_folder(path, series_uid, volume_index, allow_4d)
        else:
            read = _read_sitk_file(path, fmt, volume_index, allow_4d)
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
        raise _err(VolumeError, "unsupported-format", path, "SimpleITK does not read MGH files")
    messages: list[str] = []
    with _captured(messages):
        read = _read_sitk_file(path, fmt, volume_index, False)
    return _finish(read, path, allow_non_finite, messages)


def _finish(read: _Read, path: Path, allow_non_finite: bool, messages: list[str]) -> Volume:
    data = read.data
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    if data.shape != read.plan.out_shape:
        data = data.reshape(read.plan.out_shape)
    affine = np.asarray(read.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise _err(
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
        raise _err(
            VolumeContentError,
            "bad-affine",
            path,
            f"degenerate affine (voxel sizes {sizes} mm, determinant {det:g}); the header's "
            "voxel size or orientation is broken",
        )
    if data.dtype.kind in "fc":
        finite = np.isfinite(data)
        bad = int(finite.size - np.count_nonzero(finite))
        if bad and not allow_non_finite:
            raise _err(
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
    meta["warnings"] = _dedupe([*meta.get("warnings", []), *messages])
    return Volume(data, affine, meta)


def _dtype_name(dtype: Any) -> str:
    dt = np.dtype(dtype)
    return str(dt if dt.isnative else dt.newbyteorder("="))


def _check_voxel_type(path: Path, dtype: np.dtype) -> None:
    if dtype.fields is not None or dtype.kind == "V":
        raise _err(
            VolumeContentError,
            "multi-component",
            path,
            f"voxels of record type {dtype} (e.g. RGB); a scalar (grey-level) volume is needed",
        )
    if dtype.kind == "c":
        raise _err(
            VolumeContentError,
            "complex",
            path,
            f"complex voxels ({dtype}); take the magnitude first (e.g. np.abs)",
        )
    if dtype.kind not in "biuf":
        raise _err(VolumeContentError, "dimensions", path, f"voxel type {dtype} is not numeric")


def _read_nibabel(path: Path, fmt: str, volume_index: int | None, allow_4d: bool) -> _Read:
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise _err(
            VolumeError,
            "corrupt",
            path,
            f"corrupt or truncated {fmt} file ({type(exc).__name__}: {_short(exc)})",
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.MGHImage)):
        raise _err(
            VolumeError,
            "no-voxel-grid",
            path,
            f"a {type(img).__name__} (no voxel grid with an affine); a NIfTI volume is needed",
        )
    header = img.header
    disk_dtype = np.dtype(img.get_data_dtype())
    _check_voxel_type(path, disk_dtype)
    slope = float(getattr(img.dataobj, "slope", 1.0) or 1.0)
    inter = float(getattr(img.dataobj, "inter", 0.0) or 0.0)
    scaled = (slope != 1.0 and not math.isnan(slope)) or (inter != 0.0 and not math.isnan(inter))
    itemsize = 8 if scaled else disk_dtype.itemsize  # scaled data comes back as float
    plan = _plan(path, header.get_data_shape(), itemsize, volume_index, allow_4d)
    try:
        if plan.index is None:
            data = np.asanyarray(img.dataobj)
        else:
            data = np.asanyarray(img.dataobj[plan.index])
        data = np.asarray(data)
    except MemoryError:
        raise
    except Exception as exc:  # EOFError / zlib.error / OSError for truncated data
        raise _err(
            VolumeError,
            "corrupt",
            path,
            f"corrupt or truncated {fmt} file; its voxel data cannot be read "
            f"({type(exc).__name__}: {_short(exc)})",
        ) from None
    affine = img.affine
    meta: dict[str, Any] = {
        "source": str(path),
        "format": fmt,
        "dtype": _dtype_name(disk_dtype),
        "warnings": [],
    }
    if fmt == "nifti":
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        meta.update(
            qform_code=qcode,
            sform_code=scode,
            nifti_version=2 if isinstance(img, nib.Nifti2Image) else 1,
        )
        if qcode == 0 and scode == 0:
            meta["warnings"].append(
                "qform_code and sform_code are both 0: the orientation is nibabel's default "
                "guess, not the scanner's"
            )
    return _Read(data, affine, meta, plan)


# ----- SimpleITK


def _sitk():
    import SimpleITK as sitk

    return sitk


def _sitk_dtype(pixel_id: int, dimension: int) -> np.dtype | None:
    sitk = _sitk()
    try:
        probe = sitk.Image([1] * max(2, dimension), pixel_id)
        return np.dtype(sitk.GetArrayViewFromImage(probe).dtype)
    except Exception:  # noqa: BLE001 - exotic pixel types (labels) have no numpy view
        return None


def sitk_geometry_to_ras(
    direction: Sequence[float], spacing: Sequence[float], origin: Sequence[float]
) -> np.ndarray:
    """The RAS+ affine of a SimpleITK/ITK image geometry (which is LPS+).

    ``A_lps[:3, :3] = D @ diag(spacing)``, ``A_lps[:3, 3] = origin``,
    ``A_ras = diag(-1, -1, 1, 1) @ A_lps``. A 2D geometry is embedded in 3D (unit third
    axis, zero third coordinate); a 4D one keeps its spatial 3x3 part.

    Args:
        direction: row-major ``n x n`` direction cosines (``image.GetDirection()``).
        spacing: ``n`` voxel sizes in mm.
        origin: ``n`` world coordinates of voxel 0 in mm.

    Returns:
        ``(4, 4)`` float64 affine for array axes in ``(x, y, z)`` order.
    """
    n = len(spacing)
    d = np.asarray(direction, dtype=np.float64).reshape(n, n)
    s = np.asarray(spacing, dtype=np.float64)
    o = np.asarray(origin, dtype=np.float64)
    m = min(n, 3)
    lps = np.eye(4)
    lps[:m, :m] = d[:m, :m] @ np.diag(s[:m])
    lps[:m, 3] = o[:m]
    return _LPS_TO_RAS @ lps


def _sitk_array(image: Any) -> np.ndarray:
    """The image's voxels in (x, y, z[, t]) order (SimpleITK gives them reversed)."""
    arr = _sitk().GetArrayFromImage(image)
    return arr.transpose(tuple(range(arr.ndim))[::-1])


def _sitk_tag(reader: Any, key: str) -> str | None:
    try:
        if reader.HasMetaDataKey(key):
            return reader.GetMetaData(key).strip()
    except Exception:  # noqa: BLE001 - metadata is best-effort
        return None
    return None


def _sitk_header(reader: Any, path: Path, fmt: str) -> None:
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        reason = _short(exc)
        if fmt == "dicom":
            raise _err(
                VolumeError,
                "dicom-unreadable",
                path,
                "GDCM cannot read an image from this DICOM file: it holds no pixel data "
                "(a DICOMDIR, report, RT plan or waveform), lacks the Part-10 header, or is "
                f"truncated or corrupt ({reason})",
            ) from None
        raise _err(
            VolumeError, "corrupt", path, f"corrupt or unreadable {fmt} file ({reason})"
        ) from None


def _sitk_check_pixels(reader: Any, path: Path) -> np.dtype | None:
    sitk = _sitk()
    ncomp = int(reader.GetNumberOfComponents())
    if ncomp > 1:
        raise _err(
            VolumeContentError,
            "multi-component",
            path,
            f"{ncomp}-component pixels (e.g. RGB colour or vectors); a scalar (grey-level) "
            "volume is needed",
        )
    pid = reader.GetPixelID()
    if pid in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise _err(VolumeContentError, "complex", path, "complex voxels; take the magnitude first")
    return _sitk_dtype(pid, int(reader.GetDimension()))


def _read_sitk_file(path: Path, fmt: str, volume_index: int | None, allow_4d: bool) -> _Read:
    sitk = _sitk()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_SITK_IMAGE_IO[fmt])
    if fmt == "dicom":
        reader.LoadPrivateTagsOff()
    _sitk_header(reader, path, fmt)
    dtype = _sitk_check_pixels(reader, path)
    if fmt == "dicom":
        _dicom_check_encoding(reader, path)
    size = tuple(int(s) for s in reader.GetSize())
    plan = _plan(path, size, dtype.itemsize if dtype is not None else 8, volume_index, allow_4d)
    try:
        image = reader.Execute()
        data = _sitk_array(image)
    except MemoryError:
        raise
    except Exception as exc:
        raise _err(
            VolumeError, "corrupt", path, f"corrupt or truncated {fmt} file ({_short(exc)})"
        ) from None
    if plan.index is not None:
        data = data[plan.index]
    affine = sitk_geometry_to_ras(image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    meta: dict[str, Any] = {
        "source": str(path),
        "format": fmt,
        "dtype": _dtype_name(dtype if dtype is not None else data.dtype),
        "warnings": [],
    }
    if fmt == "dicom":
        meta.update(_dicom_meta(reader, n_files=1))
        data = _dicom_fix_pixels(reader, data, meta["warnings"])
        if _sitk_tag(reader, "0020|0032") is None or _sitk_tag(reader, "0020|0037") is None:
            meta["warnings"].append(
                "no ImagePositionPatient/ImageOrientationPatient: the position and orientation "
                "are defaults (origin 0, identity LPS directions), not the scanner's"
            )
        if _sitk_tag(reader, "0028|0030") is None and _sitk_tag(reader, "0018|1164") is None:
            meta["warnings"].append("no PixelSpacing: in-plane voxel size is a default (1 mm)")
    return _Read(data, affine, meta, plan)


def _dicom_meta(reader: Any, n_files: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"n_files": n_files}
    for key, tag in (("series_uid", "0020|000e"), ("modality", "0008|0060")):
        value = _sitk_tag(reader, tag)
        if value:
            meta[key] = value
    return meta


_BIG_ENDIAN_TS = "1.2.840.10008.1.2.2"  # Explicit VR Big Endian (retired)


def _dicom_transfer_syntax(path: Path) -> str | None:
    """The TransferSyntaxUID (0002,0010) of a Part-10 file (its meta group is explicit VR LE)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8192)
    except OSError:
        return None
    if head[128:132] != b"DICM":
        return None
    at = head.find(b"\x02\x00\x10\x00UI", 132)
    if at < 0:
        return None
    length = int.from_bytes(head[at + 6 : at + 8], "little")
    return head[at + 8 : at + 8 + length].rstrip(b"\x00 ").decode("ascii", "replace")


def _dicom_check_encoding(reader: Any, path: Path) -> None:
    bits = _sitk_tag(reader, "0028|0100")
    if (
        bits
        and bits.isdigit()
        and int(bits) > 16
        and _dicom_transfer_syntax(path) == _BIG_ENDIAN_TS
    ):
        raise _err(
            VolumeError,
            "dicom-unsupported",
            path,
            f"{bits}-bit pixels in Explicit VR Big Endian, which GDCM decodes wrongly "
            "(16-bit words swapped); convert the file to little endian first "
            "(e.g. gdcmconv --raw, or pydicom)",
        )


def _dicom_fix_pixels(reader: Any, data: np.ndarray, notes: list[str]) -> np.ndarray:
    """Undo GDCM's 1-bit expansion and flag MONOCHROME1 inversion."""
    if (_sitk_tag(reader, "0028|0100") or "") == "1":
        # GDCM expands 1-bit pixels (e.g. DICOM SEG) to 0/255; the stored bits are 0/1
        data = (data != 0).astype(np.uint8)
    if (_sitk_tag(reader, "0028|0004") or "").upper() == "MONOCHROME1":
        notes.append(
            "MONOCHROME1: GDCM inverts the grey levels to MONOCHROME2 (high = bright), "
            "so values are (2^BitsStored - 1 - stored value) before the rescale, not the "
            "stored values"
        )
    return data


def _read_dicom_folder(
    folder: Path, series_uid: str | None, volume_index: int | None, allow_4d: bool
) -> _Read:
    sitk = _sitk()
    try:
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except Exception as exc:  # noqa: BLE001
        raise _err(
            VolumeError,
            "unreadable",
            folder,
            f"cannot scan the folder for DICOM files ({_short(exc)})",
        ) from None
    if not ids:
        raise _err(
            VolumeError,
            "dicom-series",
            folder,
            "no DICOM series in this folder (a folder is read as one DICOM series; "
            "subfolders are not searched; for a NIfTI/NRRD/MHA file pass the file itself)",
        )

    def files_of(uid: str) -> list[str]:
        return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))

    if series_uid is None:
        if len(ids) > 1:
            counts = {uid: len(files_of(uid)) for uid in ids}
            listing = "; ".join(
                f"{uid} ({n} file{'s' if n != 1 else ''})" for uid, n in counts.items()
            )
            raise _err(
                VolumeError,
                "dicom-series",
                folder,
                f"{len(ids)} DICOM series in one folder: {listing}; pick one with series_uid "
                "(CLI: --series-uid) or move each series into its own folder",
            )
        uid = ids[0]
    elif series_uid in ids:
        uid = series_uid
    else:
        raise _err(
            VolumeError,
            "dicom-series",
            folder,
            f"no DICOM series {series_uid} in this folder; it holds {', '.join(ids)}",
        )
    files = files_of(uid)
    if len(files) == 1:
        read = _read_sitk_file(Path(files[0]), "dicom", volume_index, allow_4d)
        read.meta.update(source=str(folder), series_uid=uid)
        return read
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.SetImageIO("GDCMImageIO")
    _sitk_header(first, Path(files[0]), "dicom")
    dtype = _sitk_check_pixels(first, Path(files[0]))
    _dicom_check_encoding(first, Path(files[0]))
    size = [int(s) for s in first.GetSize()]
    if len(size) >= 3 and size[2] > 1:
        raise _err(
            VolumeContentError,
            "dicom-series",
            folder,
            f"series {uid} holds multi-frame files ({size[2]} frames each); load one file "
            "at a time",
        )
    plan = _plan(
        folder,
        (size[0], size[1], len(files)),
        dtype.itemsize if dtype is not None else 8,
        volume_index,
        allow_4d,
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetImageIO("GDCMImageIO")
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
        data = _sitk_array(image)
    except MemoryError:
        raise
    except Exception as exc:
        raise _err(
            VolumeError, "corrupt", folder, f"cannot read DICOM series {uid} ({_short(exc)})"
        ) from None
    affine = sitk_geometry_to_ras(image.GetDirection(), image.GetSpacing(), image.GetOrigin())
    meta: dict[str, Any] = {
        "source": str(folder),
        "format": "dicom",
        "dtype": _dtype_name(dtype if dtype is not None else data.dtype),
        "warnings": [],
    }
    meta.update(_dicom_meta(first, n_files=len(files)))
    meta["series_uid"] = uid
    data = _dicom_fix_pixels(first, data, meta["warnings"])
    _check_slice_positions(folder, uid, reader, image, len(files), meta["warnings"])
    return _Read(data, affine, meta, plan)


def _check_slice_positions(
    folder: Path, uid: str, reader: Any, image: Any, n: int, notes: list[str]
) -> None:
    """Raise unless every slice's ImagePositionPatient lies where the affine puts it.

    ITK derives the slice spacing from the first and last slice only; missing slices,
    uneven gaps, a tilted gantry or several echoes in one series would otherwise give a
    silently wrong geometry.
    """
    positions = []
    for k in range(n):
        try:
            raw = reader.GetMetaData(k, "0020|0032")
            positions.append([float(v) for v in raw.strip().split("\\")[:3]])
        except Exception:  # noqa: BLE001
            notes.append(
                "some slices have no ImagePositionPatient: slice positions were not checked"
            )
            return
    lps = np.asarray(positions)
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    s = np.asarray(image.GetSpacing(), dtype=np.float64)
    o = np.asarray(image.GetOrigin(), dtype=np.float64)
    expected = o + (d @ np.diag(s))[:, 2][None, :] * np.arange(n)[:, None]
    off = np.linalg.norm(lps - expected, axis=1)
    tol = max(1e-3, 0.02 * float(s[2]))
    worst = int(np.argmax(off))
    if off[worst] > tol:
        raise _err(
            VolumeContentError,
            "dicom-geometry",
            folder,
            f"DICOM series {uid}: slice {worst} of {n} lies {off[worst]:.3g} mm from where a "
            f"regular grid of {s[2]:.4g} mm slices puts it (missing slices, uneven spacing, "
            "gantry tilt, or several echoes/time points in one series); medidiff needs a "
            "regular 3D grid",
        )


# --------------------------------------------------------------------------- writing


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable_folder(folder: str | os.PathLike) -> Path:
    """Fail before any work when files cannot be written into ``folder``.

    Nothing is left behind: the folder is not created; a temporary file is created and
    removed in ``folder`` or, when it does not exist yet, in its nearest existing
    ancestor (where creating it would have to write). Permission bits, read-only mounts
    and immutable folders are all caught, since the probe really writes.

    Args:
        folder: the output folder (it may not exist yet).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        OutputError: ``folder`` or an ancestor is a file, or nothing can be written there.

    Example:
        >>> import tempfile
        >>> check_writable_folder(tempfile.mkdtemp()).is_dir()
        True
    """
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{folder}: {probe} is a file, not a folder; choose another output")
    where = "cannot write here" if probe == folder else f"cannot create it in {probe}"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".medidiff-write-test-", dir=probe)
    except OSError as exc:
        raise OutputError(f"{folder}: {where} ({exc.strerror})") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return folder


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``.

    The temporary name keeps the full suffix (``.nii.gz``) so writers that look at the
    extension behave. If the body raises, the temporary file is removed, ``path`` keeps
    its old content (or stays absent) and the body's exception propagates unchanged; the
    written file gets the permissions a plain ``open()`` would give (umask), not
    ``mkstemp``'s 0600.

    Args:
        path: the final destination; missing parent folders are created.
        overwrite: replace an existing file (else :class:`OutputError` before writing).

    Raises:
        OutputError: ``path`` exists and ``overwrite`` is False, or the folder cannot be
            created or written.

    Example:
        >>> import os, tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> with atomic_path(target) as tmp:
        ...     _ = tmp.write_text("done")
        >>> open(target).read()
        'done'
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
    if path.is_dir():
        raise OutputError(f"{path}: is a folder; give a file name")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{parent}: cannot create output folder ({exc.strerror})") from None
    suffix = "".join(path.suffixes[-2:]) if path.name.lower().endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=parent)
    except OSError as exc:
        raise OutputError(f"{parent}: cannot write here ({exc.strerror})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes 0600 files; give the result the permissions a plain open() would
        with contextlib.suppress(OSError):
            os.chmod(tmp_path, 0o666 & ~_umask())
        try:
            os.replace(tmp_path, path)
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def write_text_atomic(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically.

    Args:
        path: destination file.
        text: the content.
        overwrite: replace an existing file (else :class:`OutputError`).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            tmp.write_text(text, encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror})") from None
    return path


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def write_json_atomic(
    path: str | os.PathLike, obj: Any, *, overwrite: bool = True, indent: int = 2
) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (numpy scalars/arrays and paths allowed).

    Non-finite floats are written as ``NaN``/``Infinity`` (Python's json default).

    Args:
        path: destination file.
        obj: a JSON-serialisable object.
        overwrite: replace an existing file (else :class:`OutputError`).
        indent: indentation of the written JSON.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.
    """
    text = json.dumps(obj, indent=indent, default=_json_default) + "\n"
    return write_text_atomic(path, text, overwrite=overwrite)


def _output_dtype(data: np.ndarray, dtype: Any, meta: Mapping[str, Any], path: Path) -> np.dtype:
    if dtype is not None:
        try:
            target = np.dtype(dtype)
        except TypeError:
            raise OutputError(f"{path}: unknown dtype {dtype!r}") from None
    else:
        target = data.dtype if data.dtype.isnative else data.dtype.newbyteorder("=")
        computed_f64 = target == np.float64 and meta.get("dtype") != "float64"
        if computed_f64 or target == np.float16:
            target = np.dtype(np.float32)
    if target == np.bool_:
        target = np.dtype(np.uint8)
    if target.kind not in "biuf" or target.fields is not None:
        raise OutputError(f"{path}: cannot write voxels of type {target}; use a numeric dtype")
    return target


def _cast(data: np.ndarray, target: np.dtype, path: Path) -> np.ndarray:
    if data.dtype == target:
        return data
    if data.dtype.kind == "f" and target.kind in "iu":
        if not np.all(np.isfinite(data)):
            raise OutputError(f"{path}: NaN/Inf values cannot be stored as {target}")
        rounded = np.rint(data)
        info = np.iinfo(target)
        if rounded.size and (rounded.min() < info.min or rounded.max() > info.max):
            raise OutputError(
                f"{path}: values {rounded.min():g}..{rounded.max():g} do not fit {target} "
                f"({info.min}..{info.max}); pick a wider dtype"
            )
        return rounded.astype(target)
    return data.astype(target)


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
    import nibabel as nib

    path = Path(path)
    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise OutputError(f"{path}: medidiff writes NIfTI; use a .nii or .nii.gz name")
    data = np.asarray(volume.array)
    if data.ndim < 2 or data.ndim > 4:
        raise OutputError(
            f"{path}: cannot write {data.ndim}D data of shape {data.shape}; 2D to 4D is written"
        )
    data = _cast(data, _output_dtype(data, dtype, volume.meta, path), path)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    affine = volume.affine
    big = max(data.shape) > 32767
    image_cls = (
        nib.Nifti2Image if (big or volume.meta.get("nifti_version") == 2) else nib.Nifti1Image
    )
    img = image_cls(data, affine, dtype=data.dtype)
    qcode = int(volume.meta.get("qform_code", 1))
    scode = int(volume.meta.get("sform_code", 1))
    try:
        img.set_qform(affine, code=qcode, strip_shears=True)
    except nib.spatialimages.HeaderDataError:  # no rotation fits (degenerate affine)
        img.set_qform(None)
        scode = max(scode, 1)
    img.set_sform(affine, code=scode)
    # Keep the source's codes only if a reader would then rebuild this affine.
    tol = 1e-4 * max(1.0, float(np.abs(affine).max()))
    if not np.allclose(img.header.get_best_affine(), affine, rtol=0, atol=tol):
        img.set_sform(affine, code=max(scode, 1))
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            nib.save(img, str(tmp))
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path
