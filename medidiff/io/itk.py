"""NRRD, MetaImage (and, for cross-checks, NIfTI) files through SimpleITK, converted to RAS.

SimpleITK works in LPS+ (ITK/DICOM convention). Its geometry becomes a RAS affine by
``A_ras = diag(-1, -1, 1, 1) @ A_lps`` with ``A_lps[:3, :3] = D @ diag(spacing)`` and
``A_lps[:3, 3] = origin``; its arrays come in ``(z, y, x)`` order and are transposed to
``(x, y, z)`` so that array axes match the affine's voxel axes. The DICOM readers in
:mod:`medidiff.io.dicom` build on the helpers here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import VolumeContentError, VolumeError
from medidiff.io.reading import RawRead, dtype_name, plan_read, short_message, volume_error

# RAS = LPS with x and y negated (NIfTI vs ITK/DICOM world conventions).
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

_SITK_IMAGE_IO = {
    "nrrd": "NrrdImageIO",
    "mha": "MetaImageIO",
    "dicom": "GDCMImageIO",
    "nifti": "NiftiImageIO",
}


def sitk_module():
    """SimpleITK, imported on first use (it takes a moment)."""
    import SimpleITK as sitk

    return sitk


def _sitk_dtype(pixel_id: int, dimension: int) -> np.dtype | None:
    sitk = sitk_module()
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


def image_affine(image: Any) -> np.ndarray:
    """The RAS affine of a SimpleITK image."""
    return sitk_geometry_to_ras(image.GetDirection(), image.GetSpacing(), image.GetOrigin())


def sitk_array(image: Any) -> np.ndarray:
    """The image's voxels in (x, y, z[, t]) order (SimpleITK gives them reversed)."""
    arr = sitk_module().GetArrayFromImage(image)
    return arr.transpose(tuple(range(arr.ndim))[::-1])


def sitk_tag(reader: Any, key: str) -> str | None:
    """A metadata value of a file reader (``"0028|0100"``), stripped; ``None`` if absent."""
    try:
        if reader.HasMetaDataKey(key):
            return reader.GetMetaData(key).strip()
    except Exception:  # noqa: BLE001 - metadata is best-effort
        return None
    return None


def read_header(reader: Any, path: Path, fmt: str) -> None:
    """``reader.ReadImageInformation()``, its failure as one clear error."""
    try:
        reader.ReadImageInformation()
    except Exception as exc:
        reason = short_message(exc)
        if fmt == "dicom":
            raise volume_error(
                VolumeError,
                "dicom-unreadable",
                path,
                "GDCM cannot read an image from this DICOM file: it holds no pixel data "
                "(a DICOMDIR, report, RT plan or waveform), lacks the Part-10 header, or is "
                f"truncated or corrupt ({reason})",
            ) from None
        raise volume_error(
            VolumeError, "corrupt", path, f"corrupt or unreadable {fmt} file ({reason})"
        ) from None


def check_pixels(reader: Any, path: Path) -> np.dtype | None:
    """Refuse multi-component and complex pixels; the numpy dtype of the pixels if known."""
    sitk = sitk_module()
    ncomp = int(reader.GetNumberOfComponents())
    if ncomp > 1:
        raise volume_error(
            VolumeContentError,
            "multi-component",
            path,
            f"{ncomp}-component pixels (e.g. RGB colour or vectors); a scalar (grey-level) "
            "volume is needed",
        )
    pid = reader.GetPixelID()
    if pid in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        raise volume_error(
            VolumeContentError, "complex", path, "complex voxels; take the magnitude first"
        )
    return _sitk_dtype(pid, int(reader.GetDimension()))


def execute(reader: Any, path: Path, problem: str) -> tuple[Any, np.ndarray]:
    """Run a (file or series) reader: the image and its ``(x, y, z[, t])`` array.

    Raises:
        VolumeError: the reader failed; ``problem`` starts the message.
    """
    try:
        image = reader.Execute()
        return image, sitk_array(image)
    except MemoryError:
        raise
    except Exception as exc:
        raise volume_error(VolumeError, "corrupt", path, f"{problem} ({short_message(exc)})") from None


def read_file_with_reader(
    path: Path,
    fmt: str,
    volume_index: int | None,
    allow_4d: bool,
    *,
    check: Callable[[Any, Path], None] | None = None,
) -> tuple[RawRead, Any]:
    """Read one file with SimpleITK: the result and the file reader (for its metadata).

    Args:
        path: the file.
        fmt: ``"nrrd"``, ``"mha"``, ``"nifti"`` or ``"dicom"``.
        volume_index, allow_4d: as for :func:`~medidiff.io.volume.load_volume`.
        check: called with the reader after the header is read, before the voxels are.
    """
    sitk = sitk_module()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO(_SITK_IMAGE_IO[fmt])
    if fmt == "dicom":
        reader.LoadPrivateTagsOff()
    read_header(reader, path, fmt)
    dtype = check_pixels(reader, path)
    if check is not None:
        check(reader, path)
    size = tuple(int(s) for s in reader.GetSize())
    plan = plan_read(path, size, dtype.itemsize if dtype is not None else 8, volume_index, allow_4d)
    image, data = execute(reader, path, f"corrupt or truncated {fmt} file")
    if plan.index is not None:
        data = data[plan.index]
    meta: dict[str, Any] = {
        "source": str(path),
        "format": fmt,
        "dtype": dtype_name(dtype if dtype is not None else data.dtype),
        "warnings": [],
    }
    return RawRead(data, image_affine(image), meta, plan), reader


def read_sitk_file(path: Path, fmt: str, volume_index: int | None, allow_4d: bool) -> RawRead:
    """Read an NRRD, MetaImage or NIfTI file with SimpleITK."""
    return read_file_with_reader(path, fmt, volume_index, allow_4d)[0]
