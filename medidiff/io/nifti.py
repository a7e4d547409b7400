"""NIfTI-1/2 and MGH files through nibabel: reading with the header's geometry, writing NIfTI.

nibabel's ``img.affine`` is already RAS+ (for MGH too), so no conversion is needed. Only
the picked volume of a 4D file is read (``img.dataobj[index]``), and scaled data
(``scl_slope``/``scl_inter``) comes back scaled, as nibabel returns it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import OutputError, VolumeError
from medidiff.io.atomic import atomic_path
from medidiff.io.reading import (
    RawRead,
    check_voxel_type,
    dtype_name,
    plan_read,
    short_message,
    volume_error,
)

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def read_nibabel(path: Path, fmt: str, volume_index: int | None, allow_4d: bool) -> RawRead:
    """Read a NIfTI or MGH file (``fmt`` ``"nifti"`` or ``"mgh"``).

    Raises:
        VolumeError: corrupt/truncated file, or an image without a voxel grid (CIFTI).
        VolumeContentError: see :func:`~medidiff.io.reading.plan_read`.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path), mmap=False)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise volume_error(
            VolumeError,
            "corrupt",
            path,
            f"corrupt or truncated {fmt} file ({type(exc).__name__}: {short_message(exc)})",
        ) from None
    if not isinstance(img, (nib.Nifti1Image, nib.MGHImage)):
        raise volume_error(
            VolumeError,
            "no-voxel-grid",
            path,
            f"a {type(img).__name__} (no voxel grid with an affine); a NIfTI volume is needed",
        )
    disk_dtype = np.dtype(img.get_data_dtype())
    check_voxel_type(path, disk_dtype)
    slope = float(getattr(img.dataobj, "slope", 1.0) or 1.0)
    inter = float(getattr(img.dataobj, "inter", 0.0) or 0.0)
    scaled = (slope != 1.0 and not math.isnan(slope)) or (inter != 0.0 and not math.isnan(inter))
    itemsize = 8 if scaled else disk_dtype.itemsize  # scaled data comes back as float
    plan = plan_read(path, img.header.get_data_shape(), itemsize, volume_index, allow_4d)
    data = _voxels(img, plan.index, path, fmt)
    meta: dict[str, Any] = {
        "source": str(path),
        "format": fmt,
        "dtype": dtype_name(disk_dtype),
        "warnings": [],
    }
    if fmt == "nifti":
        meta.update(_nifti_meta(img))
    return RawRead(data, img.affine, meta, plan)


def _voxels(img: Any, index: tuple[Any, ...] | None, path: Path, fmt: str) -> np.ndarray:
    try:
        if index is None:
            data = np.asanyarray(img.dataobj)
        else:
            data = np.asanyarray(img.dataobj[index])
        return np.asarray(data)
    except MemoryError:
        raise
    except Exception as exc:  # EOFError / zlib.error / OSError for truncated data
        raise volume_error(
            VolumeError,
            "corrupt",
            path,
            f"corrupt or truncated {fmt} file; its voxel data cannot be read "
            f"({type(exc).__name__}: {short_message(exc)})",
        ) from None


def _nifti_meta(img: Any) -> dict[str, Any]:
    import nibabel as nib

    header = img.header
    qcode, scode = int(header["qform_code"]), int(header["sform_code"])
    meta: dict[str, Any] = {
        "qform_code": qcode,
        "sform_code": scode,
        "nifti_version": 2 if isinstance(img, nib.Nifti2Image) else 1,
        "warnings": [],
    }
    if qcode == 0 and scode == 0:
        meta["warnings"].append(
            "qform_code and sform_code are both 0: the orientation is nibabel's default "
            "guess, not the scanner's"
        )
    return meta


# --------------------------------------------------------------------------- writing


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


def write_nifti(
    array: np.ndarray,
    affine: np.ndarray,
    meta: Mapping[str, Any],
    path: Path,
    *,
    dtype: np.dtype | str | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``array`` with ``affine`` as NIfTI atomically (see :func:`~medidiff.io.volume.save_volume`).

    Args:
        array: 2D to 4D voxels.
        affine: ``(4, 4)`` RAS affine.
        meta: the volume's metadata (``dtype``, ``qform_code``, ``sform_code``,
            ``nifti_version`` of a NIfTI source are honoured).
        path: destination ending in ``.nii`` or ``.nii.gz``.
        dtype: on-disk dtype (default: see ``save_volume``).
        overwrite: replace an existing file.

    Raises:
        OutputError: not a NIfTI name, exists without ``overwrite``, values that do not
            fit ``dtype``, or the file cannot be written.
    """
    import nibabel as nib

    if not path.name.lower().endswith(NIFTI_SUFFIXES):
        raise OutputError(f"{path}: medidiff writes NIfTI; use a .nii or .nii.gz name")
    data = np.asarray(array)
    if data.ndim < 2 or data.ndim > 4:
        raise OutputError(
            f"{path}: cannot write {data.ndim}D data of shape {data.shape}; 2D to 4D is written"
        )
    data = _cast(data, _output_dtype(data, dtype, meta, path), path)
    if not data.dtype.isnative:
        data = data.astype(data.dtype.newbyteorder("="))
    big = max(data.shape) > 32767
    image_cls = nib.Nifti2Image if (big or meta.get("nifti_version") == 2) else nib.Nifti1Image
    img = image_cls(data, affine, dtype=data.dtype)
    _set_codes(img, affine, int(meta.get("qform_code", 1)), int(meta.get("sform_code", 1)))
    img.header.set_xyzt_units("mm", "sec")
    with atomic_path(path, overwrite=overwrite) as tmp:
        try:
            nib.save(img, str(tmp))
        except OSError as exc:
            raise OutputError(f"{path}: cannot write ({exc.strerror or exc})") from None
    return path


def _set_codes(img: Any, affine: np.ndarray, qcode: int, scode: int) -> None:
    """qform and sform carrying ``affine``; the source's codes only if they rebuild it."""
    import nibabel as nib

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
