"""What every reader shares: errors with reason codes, the read plan, quiet readers.

The readers (:mod:`medidiff.io.nifti`, :mod:`medidiff.io.itk`, :mod:`medidiff.io.dicom`)
read a file's header first and call :func:`plan_read` with its shape, so that 4D data,
odd dimensions and arrays over ``MEDIDIFF_MAX_VOXEL_BYTES`` are refused before any voxel
is allocated. Each returns a :class:`RawRead`, which :func:`medidiff.io.volume.load_volume`
checks (affine, NaN/Inf) and turns into a :class:`~medidiff.io.volume.Volume`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import ConfigError, VolumeContentError, VolumeError

#: Reason codes carried by the ``reason`` attribute of the errors the readers raise.
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


# --------------------------------------------------------------------------- errors


def volume_error(cls: type[VolumeError], reason: str, path: Any, problem: str) -> VolumeError:
    """An error whose message starts with the path and which carries a ``reason`` code."""
    exc = cls(f"{path}: {problem}")
    exc.reason = reason  # type: ignore[attr-defined]
    return exc


def short_message(exc: BaseException, limit: int = 240) -> str:
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


# --------------------------------------------------------------------------- size and shape


def max_voxel_bytes() -> int:
    """The largest array :func:`~medidiff.io.volume.load_volume` allocates, in bytes.

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
class ReadPlan:
    """What to read, decided from the header shape before any voxel is read."""

    disk_shape: tuple[int, ...]  # as the header gives it, x-fastest (X, Y, Z, T, ...)
    out_shape: tuple[int, ...]  # what the returned array will have: (X, Y, Z[, T])
    index: tuple[Any, ...] | None  # numpy index into the on-disk array (None: all of it)
    volume_index: int | None  # the picked 4D volume, normalised to >= 0


def plan_read(
    path: Path, shape: Sequence[int], itemsize: int, volume_index: int | None, allow_4d: bool
) -> ReadPlan:
    """Decide the returned shape and the index into the on-disk array, or refuse the file.

    Args:
        path: the file (for messages).
        shape: the header's shape, x-fastest.
        itemsize: bytes per returned voxel.
        volume_index: the 4D volume asked for, if any.
        allow_4d: keep 4D data whole.

    Raises:
        VolumeError: a negative dimension (corrupt header).
        VolumeContentError: 1D, 5D+, zero-size or 4D data not asked for; a bad
            ``volume_index``; more than :func:`max_voxel_bytes`.
    """
    disk = tuple(int(s) for s in shape)
    core = _core_shape(path, disk)
    if len(core) == 4:
        out, index, picked = _plan_4d(path, disk, core, volume_index, allow_4d)
    else:
        out, index, picked = _plan_3d(path, disk, core, volume_index)
    _check_size(path, out, itemsize)
    return ReadPlan(disk, out, index, picked)


def _core_shape(path: Path, disk: tuple[int, ...]) -> list[int]:
    """The header shape without trailing singleton axes beyond the third, checked."""
    if any(s < 0 for s in disk):
        raise volume_error(VolumeError, "corrupt", path, f"negative dimension in header shape {disk}")
    core = list(disk)
    while len(core) > 3 and core[-1] == 1:  # (X, Y, Z, 1, 1) is 3D
        core.pop()
    if len(core) < 2:
        raise volume_error(
            VolumeContentError,
            "dimensions",
            path,
            f"{len(core)}D data of shape {disk}; an image or volume is needed",
        )
    if 0 in core:
        raise volume_error(
            VolumeContentError,
            "dimensions",
            path,
            f"empty array of shape {disk} (a zero-size axis)",
        )
    if len(core) > 4:
        raise volume_error(
            VolumeContentError,
            "dimensions",
            path,
            f"{len(core)}D data of shape {disk}; medidiff reads 3D volumes or one volume "
            "of a 4D file",
        )
    return core


def _plan_4d(
    path: Path, disk: tuple[int, ...], core: list[int], volume_index: int | None, allow_4d: bool
) -> tuple[tuple[int, ...], tuple[Any, ...] | None, int | None]:
    n = core[3]
    if volume_index is not None:
        if not -n <= volume_index < n:
            raise volume_error(
                VolumeContentError,
                "4d",
                path,
                f"volume index {volume_index} out of range for {n} volumes (0..{n - 1})",
            )
        picked = volume_index % n
        index = (slice(None),) * 3 + (picked,) + (0,) * (len(disk) - 4)
        return tuple(core[:3]), index, picked
    if allow_4d:
        index = (slice(None),) * 4 + (0,) * (len(disk) - 4) if len(disk) > 4 else None
        return tuple(core), index, None
    raise volume_error(
        VolumeContentError,
        "4d",
        path,
        f"4D data of shape {disk} ({n} volumes) where a 3D volume is needed; "
        "pick one with --volume-index N (medidiff info, anomaly, calibrate; Python: "
        "load_volume(..., volume_index=N)), or split it into 3D files first (e.g. FSL's "
        "'fslsplit FILE OUT -t') and list those for train and the other commands",
    )


def _plan_3d(
    path: Path, disk: tuple[int, ...], core: list[int], volume_index: int | None
) -> tuple[tuple[int, ...], tuple[Any, ...] | None, None]:
    if volume_index is not None and volume_index not in (0, -1):
        raise volume_error(
            VolumeContentError,
            "4d",
            path,
            f"volume index {volume_index} given but the file holds a single volume",
        )
    out = (core[0], core[1], 1) if len(core) == 2 else tuple(core)  # 2D: depth 1
    index = (slice(None),) * 3 + (0,) * (len(disk) - 3) if len(disk) > 3 else None
    return out, index, None


def _check_size(path: Path, out: tuple[int, ...], itemsize: int) -> None:
    need = math.prod(out) * max(1, int(itemsize))
    limit = max_voxel_bytes()
    if need > limit:
        raise volume_error(
            VolumeContentError,
            "too-large",
            path,
            f"{'x'.join(map(str, out))} voxels of {itemsize} bytes would need {_gib(need)}, over "
            f"the {_gib(limit)} limit; set {_MAX_VOXEL_BYTES_ENV} higher if this machine has "
            "the memory",
        )


# --------------------------------------------------------------------------- voxel types


def dtype_name(dtype: Any) -> str:
    """The dtype's name in native byte order (``>f4`` -> ``float32``)."""
    dt = np.dtype(dtype)
    return str(dt if dt.isnative else dt.newbyteorder("="))


def check_voxel_type(path: Path, dtype: np.dtype) -> None:
    """Refuse record (RGB), complex and non-numeric voxel types."""
    if dtype.fields is not None or dtype.kind == "V":
        raise volume_error(
            VolumeContentError,
            "multi-component",
            path,
            f"voxels of record type {dtype} (e.g. RGB); a scalar (grey-level) volume is needed",
        )
    if dtype.kind == "c":
        raise volume_error(
            VolumeContentError,
            "complex",
            path,
            f"complex voxels ({dtype}); take the magnitude first (e.g. np.abs)",
        )
    if dtype.kind not in "biuf":
        raise volume_error(VolumeContentError, "dimensions", path, f"voxel type {dtype} is not numeric")


@dataclass
class RawRead:
    """A reader's result before the common checks."""

    data: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any]
    plan: ReadPlan


# --------------------------------------------------------------------------- quiet readers


@contextlib.contextmanager
def quiet_readers(messages: list[str], *, itk: bool = False) -> Iterator[None]:
    """Collect reader chatter in ``messages`` instead of letting it reach the terminal.

    Uses each library's own switch, never a redirection of the process's stderr: Python
    warnings (nibabel, pydicom) are recorded with :func:`warnings.catch_warnings`;
    nibabel's log records (its ``nibabel.global`` logger) go to a handler that appends
    them; with ``itk=True``, ITK/GDCM warnings are switched off through SimpleITK's
    ``ProcessObject.SetGlobalWarningDisplay`` (their text is not collected). Every
    switch is restored on exit. Warning filters and logger handlers are process-wide, so
    only the main thread switches them; other threads read unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    import nibabel.imageglobals as nib_globals

    nib_logger = nib_globals.logger
    saved_logging = (nib_logger.handlers[:], nib_logger.propagate)
    try:
        nib_logger.handlers = [_ListHandler(messages)]
        nib_logger.propagate = False
        with warnings.catch_warnings(record=True) as caught, _itk_warnings_off(itk):
            warnings.simplefilter("always")
            try:
                yield
            finally:
                messages.extend(str(w.message) for w in caught)
    finally:
        nib_logger.handlers, nib_logger.propagate = saved_logging


@contextlib.contextmanager
def _itk_warnings_off(active: bool) -> Iterator[None]:
    if not active:
        yield
        return
    import SimpleITK as sitk

    saved = bool(sitk.ProcessObject.GetGlobalWarningDisplay())
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(saved)


@contextlib.contextmanager
def native_stderr_to(messages: list[str]) -> Iterator[None]:
    """For command-line programs only: collect what native code writes to file descriptor 2.

    libjpeg, OpenJPEG and GDCM print some diagnostics straight to the C ``stderr`` with
    no switch to turn them off, so a command that promises one clean line on stderr (such
    as ``medidiff info``) catches them here, lines appended to ``messages``. This
    redirects descriptor 2 for the whole process while it lasts: the library never calls
    it; only a program that owns its process should. Only the main thread redirects.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    native = tempfile.TemporaryFile()
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


def dedupe(items: Sequence[str]) -> list[str]:
    """Messages with whitespace folded, each once, repeats counted (``"msg (x3)"``)."""
    seen: dict[str, int] = {}
    for item in items:
        item = " ".join(str(item).split())
        if item:
            seen[item] = seen.get(item, 0) + 1
    return [k if n == 1 else f"{k} (x{n})" for k, n in seen.items()]
