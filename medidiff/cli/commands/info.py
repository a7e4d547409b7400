"""Describe a volume: shape, voxel spacing, orientation, affine, dtype and intensity range.

FILE is a NIfTI (.nii, .nii.gz), MGH (.mgh, .mgz), NRRD (.nrrd, .nhdr), MetaImage
(.mha, .mhd) or DICOM file, or a folder holding one DICOM series. The affine maps voxel
indices to RAS+ millimetres (NIfTI's convention; DICOM/ITK files are converted from LPS).
Orientation codes name where each array axis points, e.g. LPS = axis 0 towards Left,
axis 1 towards Posterior, axis 2 towards Superior.

A 4D file is described whole (shape X x Y x Z x T, range over every volume) unless
--volume-index picks one. NaN/Inf voxels are counted rather than refused; min and max are
over the finite voxels. With --json the output is exactly one JSON object with the keys
shape, spacing, orientation, affine, dtype, min, max (plus path, format, disk_dtype,
non_finite, volumes, warnings and format details).

Examples:
    medidiff info sub-01_T1w.nii.gz
    medidiff info ct_series_folder/ --json
    medidiff info bold.nii.gz --volume-index 0
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from medidiff.io import Volume

# Extra metadata worth showing when a reader provides it.
_DETAIL_KEYS = (
    "qform_code",
    "sform_code",
    "nifti_version",
    "series_uid",
    "n_files",
    "modality",
    "volume_index",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="volume file or DICOM series folder")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object instead of the text table"
    )
    p.add_argument(
        "--volume-index",
        type=int,
        default=None,
        metavar="N",
        help="for a 4D file, describe only volume N (0-based; default: the whole 4D file)",
    )
    p.add_argument(
        "--series-uid",
        default=None,
        metavar="UID",
        help="for a DICOM folder with several series, the SeriesInstanceUID to describe",
    )


def run(args: argparse.Namespace) -> int:
    import json

    from medidiff.io import Volume, load_volume
    from medidiff.io.reading import dedupe, native_stderr_to

    # this command owns its process: text that JPEG/JPEG 2000 decoders print straight to
    # stderr becomes warning rows, so stderr keeps only the one-line error
    native: list[str] = []
    with native_stderr_to(native):
        volume = load_volume(
            args.file,
            volume_index=args.volume_index,
            allow_non_finite=True,
            allow_4d=True,
            series_uid=args.series_uid,
        )
    if native:
        notes = dedupe([*volume.meta.get("warnings", []), *native])
        volume = Volume(volume.array, volume.affine, {**volume.meta, "warnings": notes})
    summary = describe(volume)
    if args.json:
        # one key per line, each value compact (the affine stays a readable 4x4 list)
        body = ",\n".join(
            f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in summary.items()
        )
        print("{\n" + body + "\n}")
    else:
        print(format_summary(summary))
    return 0


def describe(volume: Volume) -> dict[str, Any]:
    """A JSON-ready description of ``volume``.

    Args:
        volume: a loaded volume, ``(X, Y, Z)`` or ``(X, Y, Z, T)``.

    Returns:
        A dict with ``path``, ``format``, ``shape``, ``spacing`` (mm, spatial axes),
        ``orientation``, ``affine`` (4x4 list), ``dtype`` (in memory), ``disk_dtype``,
        ``min``/``max`` over finite voxels (``None`` if there are none), ``non_finite``
        (count), ``volumes`` (T, 1 for 3D), ``warnings`` and any format details.
    """
    import numpy as np

    data = volume.array
    meta = volume.meta
    non_finite = 0
    values = data
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        non_finite = int(finite.size - np.count_nonzero(finite))
        if non_finite:
            values = data[finite]
    if values.size:
        lo, hi = values.min(), values.max()
        cast = int if data.dtype.kind in "biu" else float
        vmin, vmax = cast(lo), cast(hi)
    else:
        vmin = vmax = None
    summary: dict[str, Any] = {
        "path": str(meta.get("source", "")),
        "format": meta.get("format"),
        "shape": list(volume.shape),
        "spacing": [float(s) for s in volume.spacing],
        "orientation": volume.orientation,
        "affine": [[float(v) for v in row] for row in volume.affine],
        "dtype": str(data.dtype),
        "disk_dtype": meta.get("dtype", str(data.dtype)),
        "min": vmin,
        "max": vmax,
        "non_finite": non_finite,
        "volumes": int(volume.shape[3]) if len(volume.shape) == 4 else 1,
    }
    for key in _DETAIL_KEYS:
        if key in meta:
            summary[key] = meta[key]
    summary["warnings"] = list(meta.get("warnings", []))
    return summary


def _num(value: float) -> str:
    if abs(value) < 1e-9:  # float noise such as 6.7e-19 in a rotation matrix
        value = 0.0
    text = f"{value:.6g}"
    return "0" if text == "-0" else text


def format_summary(summary: dict[str, Any]) -> str:
    """The aligned text table ``medidiff info`` prints for a :func:`describe` result."""
    rows: list[tuple[str, str]] = [("file", summary["path"])]
    details = []
    if "nifti_version" in summary:
        details.append(f"NIfTI-{summary['nifti_version']}")
    for key in ("qform_code", "sform_code", "modality", "n_files"):
        if key in summary:
            details.append(f"{key} {summary[key]}")
    rows.append(
        ("format", f"{summary['format']}" + (f" ({', '.join(details)})" if details else ""))
    )
    if "series_uid" in summary:
        rows.append(("series", summary["series_uid"]))
    shape = " x ".join(str(s) for s in summary["shape"])
    if summary["volumes"] > 1:
        shape += f"  ({summary['volumes']} volumes)"
    if "volume_index" in summary:
        shape += f"  (volume {summary['volume_index']} of a 4D file)"
    rows.append(("shape", shape))
    rows.append(("spacing", " x ".join(_num(s) for s in summary["spacing"]) + " mm"))
    rows.append(("orientation", summary["orientation"]))
    dtype = summary["dtype"]
    if summary["disk_dtype"] != dtype:
        dtype += f" (on disk {summary['disk_dtype']})"
    rows.append(("dtype", dtype))
    if summary["min"] is None:
        rows.append(("range", "no finite voxels"))
    else:
        rows.append(("range", f"{_num(summary['min'])} .. {_num(summary['max'])}"))
    rows.append(("non-finite", f"{summary['non_finite']} voxels (NaN/Inf)"))
    cells = [[_num(v) for v in row] for row in summary["affine"]]
    width = max(len(c) for row in cells for c in row)
    for i, row in enumerate(cells):
        rows.append(
            ("affine" if i == 0 else "", "[ " + "  ".join(c.rjust(width) for c in row) + " ]")
        )
    for note in summary.get("warnings", []):
        rows.append(("warning", note))
    label_width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label.ljust(label_width)}{text}".rstrip() for label, text in rows)
