"""DICOM files and series folders through SimpleITK/GDCM.

A folder is read as one DICOM series (subfolders are not searched). A folder holding
several series is an error naming each SeriesInstanceUID and its number of files unless
``series_uid`` picks one. A series whose slice positions do not form a regular grid
(missing slices, uneven spacing, gantry tilt, several echoes in one series) is an error
rather than a silently wrong affine. A single DICOM file loads just that file (one slice,
or every frame of a multi-frame file).

GDCM's pixel quirks are undone or flagged: 1-bit pixels (e.g. SEG objects), which GDCM
expands to 0/255, are returned as their stored 0/1; MONOCHROME1 images come inverted to
MONOCHROME2 (high = bright), noted in ``meta["warnings"]``; 32-bit Explicit VR Big Endian
files, which GDCM decodes wrongly, are refused. A file without
ImagePositionPatient/ImageOrientationPatient or PixelSpacing loads with ITK's defaults and
a warning saying so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medidiff.errors import VolumeContentError, VolumeError
from medidiff.io.itk import (
    check_pixels,
    execute,
    image_affine,
    read_file_with_reader,
    read_header,
    sitk_module,
    sitk_tag,
)
from medidiff.io.reading import RawRead, dtype_name, plan_read, short_message, volume_error

_BIG_ENDIAN_TS = "1.2.840.10008.1.2.2"  # Explicit VR Big Endian (retired)
_MARKER_AT = 128  # the Part-10 preamble is 128 bytes, then "DICM"
_FOLDER_PROBE = 8  # files looked at to recognise a DICOM series folder


def _head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


def has_dicom_marker(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM Part-10 file (``DICM`` at byte 128); False if unreadable."""
    return _head(Path(path), _MARKER_AT + 4)[_MARKER_AT:] == b"DICM"


def is_dicom_folder(folder: str | Path) -> bool:
    """A folder whose first few visible files are DICOM (``.dcm`` or the ``DICM`` marker)."""
    folder = Path(folder)
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    return any(
        path.name.lower().endswith(".dcm") or has_dicom_marker(path)
        for path in files[:_FOLDER_PROBE]
    )


# --------------------------------------------------------------------------- one file


def _transfer_syntax(path: Path) -> str | None:
    """The TransferSyntaxUID (0002,0010) of a Part-10 file (its meta group is explicit VR LE)."""
    head = _head(path, 8192)
    if head[_MARKER_AT : _MARKER_AT + 4] != b"DICM":
        return None
    at = head.find(b"\x02\x00\x10\x00UI", _MARKER_AT + 4)
    if at < 0:
        return None
    length = int.from_bytes(head[at + 6 : at + 8], "little")
    return head[at + 8 : at + 8 + length].rstrip(b"\x00 ").decode("ascii", "replace")


def _check_encoding(reader: Any, path: Path) -> None:
    bits = sitk_tag(reader, "0028|0100")
    if bits and bits.isdigit() and int(bits) > 16 and _transfer_syntax(path) == _BIG_ENDIAN_TS:
        raise volume_error(
            VolumeError,
            "dicom-unsupported",
            path,
            f"{bits}-bit pixels in Explicit VR Big Endian, which GDCM decodes wrongly "
            "(16-bit words swapped); convert the file to little endian first "
            "(e.g. gdcmconv --raw, or pydicom)",
        )


def _dicom_meta(reader: Any, n_files: int) -> dict[str, Any]:
    meta: dict[str, Any] = {"n_files": n_files}
    for key, tag in (("series_uid", "0020|000e"), ("modality", "0008|0060")):
        value = sitk_tag(reader, tag)
        if value:
            meta[key] = value
    return meta


def _fix_pixels(reader: Any, data: np.ndarray, notes: list[str]) -> np.ndarray:
    """Undo GDCM's 1-bit expansion and flag MONOCHROME1 inversion."""
    if (sitk_tag(reader, "0028|0100") or "") == "1":
        # GDCM expands 1-bit pixels (e.g. DICOM SEG) to 0/255; the stored bits are 0/1
        data = (data != 0).astype(np.uint8)
    if (sitk_tag(reader, "0028|0004") or "").upper() == "MONOCHROME1":
        notes.append(
            "MONOCHROME1: GDCM inverts the grey levels to MONOCHROME2 (high = bright), "
            "so values are (2^BitsStored - 1 - stored value) before the rescale, not the "
            "stored values"
        )
    return data


def read_dicom_file(path: Path, volume_index: int | None, allow_4d: bool) -> RawRead:
    """Read one DICOM file (a slice, or every frame of a multi-frame file)."""
    read, reader = read_file_with_reader(
        path, "dicom", volume_index, allow_4d, check=_check_encoding
    )
    notes = read.meta["warnings"]
    read.meta.update(_dicom_meta(reader, n_files=1))
    read.data = _fix_pixels(reader, read.data, notes)
    if sitk_tag(reader, "0020|0032") is None or sitk_tag(reader, "0020|0037") is None:
        notes.append(
            "no ImagePositionPatient/ImageOrientationPatient: the position and orientation "
            "are defaults (origin 0, identity LPS directions), not the scanner's"
        )
    if sitk_tag(reader, "0028|0030") is None and sitk_tag(reader, "0018|1164") is None:
        notes.append("no PixelSpacing: in-plane voxel size is a default (1 mm)")
    return read


# --------------------------------------------------------------------------- series folders


def read_dicom_folder(
    folder: Path, series_uid: str | None, volume_index: int | None, allow_4d: bool
) -> RawRead:
    """Read the one DICOM series in ``folder`` (or the one named ``series_uid``).

    Raises:
        VolumeError: no series, several series without ``series_uid``, an unknown
            ``series_uid``, or a series GDCM cannot read.
        VolumeContentError: multi-frame files in a series, slices off a regular grid.
    """
    uid = _pick_series(folder, _series_ids(folder), series_uid)
    files = _files_of(folder, uid)
    if len(files) == 1:
        read = read_dicom_file(Path(files[0]), volume_index, allow_4d)
        read.meta.update(source=str(folder), series_uid=uid)
        return read
    return _read_series(folder, uid, files, volume_index, allow_4d)


def _series_ids(folder: Path) -> list[str]:
    sitk = sitk_module()
    try:
        ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    except Exception as exc:  # noqa: BLE001
        raise volume_error(
            VolumeError,
            "unreadable",
            folder,
            f"cannot scan the folder for DICOM files ({short_message(exc)})",
        ) from None
    if not ids:
        raise volume_error(
            VolumeError,
            "dicom-series",
            folder,
            "no DICOM series in this folder (a folder is read as one DICOM series; "
            "subfolders are not searched; for a NIfTI/NRRD/MHA file pass the file itself)",
        )
    return ids


def _files_of(folder: Path, uid: str) -> list[str]:
    return list(sitk_module().ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))


def _pick_series(folder: Path, ids: list[str], series_uid: str | None) -> str:
    if series_uid is None:
        if len(ids) > 1:
            counts = {uid: len(_files_of(folder, uid)) for uid in ids}
            listing = "; ".join(
                f"{uid} ({n} file{'s' if n != 1 else ''})" for uid, n in counts.items()
            )
            raise volume_error(
                VolumeError,
                "dicom-series",
                folder,
                f"{len(ids)} DICOM series in one folder: {listing}; pick one with series_uid "
                "(CLI: --series-uid) or move each series into its own folder",
            )
        return ids[0]
    if series_uid in ids:
        return series_uid
    raise volume_error(
        VolumeError,
        "dicom-series",
        folder,
        f"no DICOM series {series_uid} in this folder; it holds {', '.join(ids)}",
    )


def _read_series(
    folder: Path, uid: str, files: list[str], volume_index: int | None, allow_4d: bool
) -> RawRead:
    sitk = sitk_module()
    first = sitk.ImageFileReader()
    first.SetFileName(files[0])
    first.SetImageIO("GDCMImageIO")
    read_header(first, Path(files[0]), "dicom")
    dtype = check_pixels(first, Path(files[0]))
    _check_encoding(first, Path(files[0]))
    size = [int(s) for s in first.GetSize()]
    if len(size) >= 3 and size[2] > 1:
        raise volume_error(
            VolumeContentError,
            "dicom-series",
            folder,
            f"series {uid} holds multi-frame files ({size[2]} frames each); load one file "
            "at a time",
        )
    itemsize = dtype.itemsize if dtype is not None else 8
    plan = plan_read(folder, (size[0], size[1], len(files)), itemsize, volume_index, allow_4d)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetImageIO("GDCMImageIO")
    reader.MetaDataDictionaryArrayUpdateOn()
    image, data = execute(reader, folder, f"cannot read DICOM series {uid}")
    meta: dict[str, Any] = {
        "source": str(folder),
        "format": "dicom",
        "dtype": dtype_name(dtype if dtype is not None else data.dtype),
        "warnings": [],
    }
    meta.update(_dicom_meta(first, n_files=len(files)))
    meta["series_uid"] = uid
    data = _fix_pixels(first, data, meta["warnings"])
    _check_slice_positions(folder, uid, reader, image, len(files), meta["warnings"])
    return RawRead(data, image_affine(image), meta, plan)


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
        raise volume_error(
            VolumeContentError,
            "dicom-geometry",
            folder,
            f"DICOM series {uid}: slice {worst} of {n} lies {off[worst]:.3g} mm from where a "
            f"regular grid of {s[2]:.4g} mm slices puts it (missing slices, uneven spacing, "
            "gantry tilt, or several echoes/time points in one series); medidiff needs a "
            "regular 3D grid",
        )
